"""The agent's language-model runtime: small models next to the data, under policy, audited.

A frozen transformers base model (safetensors only) is loaded once; PEFT LoRA adapters,
each an approved release whose manifest names its base's manifest digest, are attached to
it, activated and dropped without reloading it, keyed by their own manifest digest, so that
a rollout swaps an adapter while requests flow and every request finishes on the version it
started with. Concurrent requests are decoded together, across adapters of the base
(`engine`). The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`,
`/v1/embeddings`) sits on the agent's server next to OIP v2, with the same app keys,
purpose and data class, policy decision, obligations and audit log (`routes`, `service`).
Requirement-checked sampling (`requirements`) draws several candidates in one batch and keeps
one that passes the caller's and the policy's checks; a policy requirement no candidate meets
lets no text leave the site. `cli` holds the model owner's tools: `sitewarden lm import-gguf`
and `sitewarden lm train-adapter`.

torch, transformers and peft are imported only when a language model is activated, so an
agent without the `lm` extra serves ONNX models as before and refuses transformers releases,
saying why.
"""
