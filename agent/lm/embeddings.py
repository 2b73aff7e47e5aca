"""The embedding model behind `/v1/embeddings`: a sentence-transformers directory, loaded offline.

`Embedder(directory)` checks the directory (`artifacts.check_embedding_dir`: standard modules,
safetensors only, no remote code) and loads it on the CPU. `embed` returns one vector per input
and the number of tokens the inputs took. Calls are serialised: the model is small, and one
caller at a time keeps torch's threads on one batch.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from agent.lm import artifacts, runtime
from agent.lm.errors import ArtifactError

MAX_INPUTS = 2048


class Embedder:
    def __init__(self, directory: Path) -> None:
        artifacts.check_embedding_dir(directory)
        runtime.configure()
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        try:
            self.model = SentenceTransformer(
                str(directory), device="cpu", local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"embedding model: sentence-transformers cannot load it: {exc}") from exc
        self.dimensions = int(self.model.get_sentence_embedding_dimension() or 0)
        self.max_tokens = int(self.model.max_seq_length or 512)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """A float32 row per text (as the model's pooling and normalisation make it) and the token count."""
        with self._lock:
            tokens = self.model.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_tokens)
            vectors = self.model.encode(texts, convert_to_numpy=True, batch_size=32, show_progress_bar=False)
        used = sum(len(ids) for ids in tokens["input_ids"])
        return np.ascontiguousarray(vectors, dtype="<f4"), used
