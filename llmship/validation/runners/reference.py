"""The FP32 PyTorch reference: the canonical model in eager mode, behind the runner protocol."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llmship.models.decoder import MobileDecoder


class ReferenceRunner:
    def __init__(self, artifact_dir: Path | None, manifest: dict | None, threads: int = 2, decoder: MobileDecoder | None = None):
        if decoder is None:
            decoder = load_pytorch_artifact(artifact_dir, manifest)
        self.decoder = decoder
        self.threads = threads
        self.executor = f"pytorch {torch.__version__} eager fp32 (canonical model)"

    @classmethod
    def from_decoder(cls, decoder: MobileDecoder, threads: int = 2) -> "ReferenceRunner":
        return cls(None, None, threads, decoder=decoder)

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        with _threads(self.threads):
            return self.decoder.prefill(torch.tensor([list(tokens)], dtype=torch.int64), input_pos).numpy()

    def decode(self, token: int, input_pos: int) -> np.ndarray:
        with _threads(self.threads):
            return self.decoder.decode(int(token), input_pos).numpy()

    def reset(self) -> None:
        self.decoder.reset_cache()

    def close(self) -> None:
        pass


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def load_pytorch_artifact(artifact_dir: Path, manifest: dict) -> MobileDecoder:
    """A `pytorch` artifact: the canonical model's weights as safetensors plus the config it came from."""
    from llmship.manifest import artifact_file
    from llmship.models import build_decoder
    from llmship.models.hf_dir import read_safetensors
    from llmship.models.loaded import LoadedModel
    from llmship.models.spec import spec_from_config
    from llmship.models.weights import check_weights

    config = manifest["model"]["config"]
    spec = spec_from_config(config)
    weights = read_safetensors([artifact_file(artifact_dir, manifest, manifest["entry_points"]["prefill"]["file"])])
    check_weights(spec, weights, str(artifact_dir))
    loaded = LoadedModel(str(artifact_dir), config, spec, weights, None)
    ring = any(n < manifest["max_context"] for n in manifest["kv_cache"].get("length_per_layer") or [])
    return build_decoder(loaded, manifest["max_context"], chunk=max(manifest["prefill_lengths"]) if ring else None)
