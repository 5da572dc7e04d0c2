"""Structural compression: the transform between the loaded model and the quantization recipe.

    FP32 model -> importance on calibration tokens -> prune (prune.py) -> share blocks (share.py) -> heal (heal.py) -> student

The student is a model of the same family (fewer layers, narrower FFN, fewer heads; adjacent layers that run one
block); every target quantizes and exports it as it would any model. The FP32 reference stays the original (what
the user started from); the student is what the compressed reference starts from, so the conversion check still
measures the converter alone.
Students are cached on disk like compression records (a key over the original's weights, the settings, the
calibration and this package's code); the manifest's `structure` holds the settings and the student's digest, so
`llmship validate` rebuilds the same student (from the cache, or by pruning and healing again) and refuses another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from llmship.errors import ConfigError, ManifestError
from llmship.progress import say, stage


def restructured(loaded, compression, calibration, evaluation):
    """The student `compression` (config.Compression) makes of `loaded`, with `.structure` set; `loaded` itself
    when nothing is pruned or shared."""
    if not compression.active:
        return loaded
    if loaded.lora:
        raise ConfigError("compression (pruning) with separate adapters is not built yet: merge the adapter, or ship it unpruned")
    from llmship.compress import cache_dir, code_digest
    from llmship.models.weights import weights_digest

    settings = {"compression": compression.model_dump(mode="json"), "calibration": calibration.model_dump(mode="json"),
                "evaluation_seed": evaluation.seed}
    key = hashlib.sha256(json.dumps({**settings, "weights": weights_digest(loaded.weights), "code": code_digest()},
                                    sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "students" / key
    student = _read(loaded, path)
    if student is None:
        student = _build(loaded, compression, calibration, evaluation, settings)
        _write(student, path)
    return student


def _build(loaded, compression, calibration, evaluation, settings: dict):
    from llmship.compress.calibration import calibration_sequences
    from llmship.compress.heal import heal
    from llmship.compress.prune import importance, pruned
    from llmship.models import build_decoder
    from llmship.models.weights import weights_digest

    from llmship.config import Evaluation

    # calibration sequences as the compression stage samples them (from the FP32 model, disjoint from evaluation),
    # as many as healing asks for
    tokens = max(calibration.tokens, compression.heal.tokens)
    sequences = calibration_sequences(loaded, calibration.model_copy(update={"tokens": tokens}), Evaluation(seed=evaluation.seed))
    teacher = build_decoder(loaded, len(sequences[0]))
    with stage("structure: measuring importance"):
        scores = importance(teacher, sequences)
    prune = compression.prune
    student, kept = pruned(loaded, scores, prune.ffn, prune.heads, prune.layers)
    if compression.share.pairs:
        from llmship.compress import share

        with stage("structure: measuring which layers can share a block"):
            costs = share.pair_costs(student, sequences)
        firsts = share.choose(costs, compression.share.pairs, loaded.source)
        student = share.with_shared(student, firsts)
        kept.update(shared=[[i, i + 1] for i in firsts], share_costs={str(i): round(c, 6) for i, c in costs.items()},
                    params=student.spec.num_params)
    say(f"structure: kept layers {kept['layers']}, FFN {kept['ffn_width_before']} -> {kept['ffn_width']} channels, heads "
        f"{kept['num_heads_before']} -> {kept['num_heads']}, shared blocks {kept.get('shared', [])}, "
        f"{kept['params_before']:,} -> {kept['params']:,} parameters")
    healing = None
    if compression.heal.steps:
        decoder = build_decoder(student, len(sequences[0]))
        healing = heal(decoder, teacher, sequences, compression.heal, seed=calibration.seed)
        state = decoder.state_dict()
        student = dataclasses.replace(student, weights={n: state[n].detach().clone() for n in student.weights})
        say(f"structure: healed {compression.heal.steps} steps in {healing['seconds']:.1f} s, "
            f"loss {healing['loss'][0]:.4f} -> {healing['loss'][-1]:.4f}")
    info = {**settings, **kept, "importance": {"layer_influence": [round(float(v), 6) for v in scores.layers]},
            "heal": healing, "digest": weights_digest(student.weights)}
    return dataclasses.replace(student, structure=info)


def _read(loaded, path):
    """The cached student at `path`, or None (a damaged entry is rebuilt, never trusted)."""
    import dataclasses as dc

    from safetensors.torch import load_file

    from llmship.models.spec import ModelSpec

    info_file, weights_file = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (info_file.is_file() and weights_file.is_file()):
        return None
    try:
        saved = json.loads(info_file.read_text())
        spec = ModelSpec(**{f.name: _tupled(saved["spec"][f.name]) for f in dc.fields(ModelSpec)})
        return dataclasses.replace(loaded, spec=spec, config=saved["config"], weights=load_file(weights_file),
                                   source_blocks={}, structure=saved["structure"])
    except Exception:
        info_file.unlink(missing_ok=True)
        return None


def _tupled(value):
    return tuple(value) if isinstance(value, list) else value


def _write(student, path) -> None:
    from safetensors.torch import save_file

    try:
        from llmship.outputs import write_atomically

        path.parent.mkdir(parents=True, exist_ok=True)  # weights first: the entry exists once its json does
        write_atomically(path.with_suffix(".safetensors"),
                         lambda tmp: save_file({n: t.contiguous() for n, t in student.weights.items()}, str(tmp)))
        info = json.dumps({"spec": dataclasses.asdict(student.spec), "config": student.config, "structure": student.structure})
        write_atomically(path.with_suffix(".json"), lambda tmp: tmp.write_text(info))
    except OSError:
        pass  # no cache: the next build prunes and heals again


def from_manifest(loaded, manifest: dict):
    """The student an artifact was built from, rebuilt from its manifest's `structure` (`loaded` when it has none);
    ManifestError when the rebuilt student is not the one the artifact holds."""
    from pydantic import ValidationError

    from llmship.config import Calibration, Compression, Evaluation

    info = manifest.get("structure")
    if not info:
        return loaded
    try:
        compression = Compression.model_validate(info["compression"])
        calibration = Calibration.model_validate(info["calibration"])
        evaluation = Evaluation(seed=info["evaluation_seed"])
        digest = info["digest"]
    except (KeyError, TypeError, ValidationError) as exc:
        raise ManifestError(f"manifest.json: structure must hold compression, calibration, evaluation_seed and digest ({exc})") from None
    student = restructured(loaded, compression, calibration, evaluation)
    if student.structure["digest"] != digest:
        raise ManifestError(f"the pruned model rebuilt from {loaded.source} (digest {student.structure['digest'][:12]}) is not the "
                            f"one the artifact was built from ({str(digest)[:12]}): a different source, machine or llmship "
                            "version; rebuild the artifact")
    return student
