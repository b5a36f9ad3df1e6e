"""What identifies a model's embeddings, wherever its files were loaded from or moved to."""

from __future__ import annotations

import hashlib
import json

# Settings that steer thinking at run time and are recorded beside the vectors on their own.
_RUN_TIME_SETTINGS = ("gate_threshold", "max_think_tokens")


def model_identity(model) -> str:
    """A hash of the backbone's fingerprint, every trained tensor (adapters, queries, gate) and the settings
    that shape an embedding: equal for a checkpoint, its copy elsewhere and a release converted from it;
    different for a checkpoint retrained in place."""
    digest = hashlib.sha256(model.backbone.fingerprint.encode())
    settings = {key: value for key, value in model.config.to_dict().items() if key not in _RUN_TIME_SETTINGS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for part in model.trainable_parameters().values():
        for name, parameter in sorted(part.items()):
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
