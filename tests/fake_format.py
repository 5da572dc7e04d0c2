"""A sixth format made only for the registry test: an exporter and a runner defined here, one profile YAML
written by the test. It reuses the reference runner, so it needs no runtime of its own."""
from __future__ import annotations

from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult
from llmship.exporters import pytorch as reference_format

FAKE_PROFILE = """
- name: fake-fp32
  description: the registry test's sixth format
  format: fake
  recipe: {weights: fp32}
  gates: {kl_mean_max: 1.0e-6}
"""


def check(target, spec=None) -> None:
    if target.recipe.weights != "fp32":
        raise ConfigError(f"{target.name}: recipe.weights {target.recipe.weights}: the fake runtime holds fp32 only")


def weight_plan(target, spec) -> tuple[dict, dict]:
    return {}, {}  # fp32 only: nothing for the compression stage to quantize


def export(job: ExportJob) -> ExportResult:
    return reference_format.export(job)


def open_runner(artifact_dir, manifest, threads):
    from llmship.validation.runners.reference import ReferenceRunner

    return ReferenceRunner(artifact_dir, manifest, threads)
