"""ClientApp: trains and evaluates the global model on the site's local CSV (`data-path` in node config)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from sitewarden_fedapp import task

# The key under which the DP strategy wrapper sends the clipping norm (flwr.supercore.differential_privacy).
_KEY_CLIPPING_NORM = "clipping_norm"


def optional_fixedclipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """`fixedclipping_mod` when the server asked for clipping (a DP run), a no-op otherwise."""
    configs = list(msg.content.config_records.values())
    if configs and _KEY_CLIPPING_NORM in configs[0]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp()


def _local_data(msg: Message, context: Context):
    """The site's features, scaled by the base release's frozen scaler when the job has one."""
    x, y = task.load_csv(str(context.node_config["data-path"]))
    configs = list(msg.content.config_records.values())
    if configs and "offset" in configs[0]:
        offset = np.asarray(configs[0]["offset"], dtype=np.float64)
        scale = np.asarray(configs[0]["scale"], dtype=np.float64)
        return (x - offset) * scale, y
    return task.transform(x), y


@app.train(mods=[optional_fixedclipping_mod])
def train(msg: Message, context: Context) -> Message:
    coef, intercept = task.from_record(msg.content["arrays"])
    x, y = _local_data(msg, context)
    coef, intercept = task.train(
        coef,
        intercept,
        x,
        y,
        epochs=int(context.run_config["local-epochs"]),
        learning_rate=float(context.run_config["learning-rate"]),
    )
    loss, accuracy = task.evaluate(coef, intercept, x, y)
    metrics = MetricRecord({"train-loss": loss, "train-accuracy": accuracy, "num-examples": len(y)})
    content = RecordDict({"arrays": task.to_record(coef, intercept), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    record: ArrayRecord = msg.content["arrays"]
    coef, intercept = task.from_record(record)
    x, y = _local_data(msg, context)
    loss, accuracy = task.evaluate(coef, intercept, x, y)
    metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
