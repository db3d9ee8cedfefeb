"""Schedulers (one file per family), routers across replicas, and the `Batch` they produce.

`SCHEDULERS` maps a policy name to its (parameters model, scheduler class); `SchedulerConfig` is the
pydantic union a config's `scheduler:` section validates against (chosen by its `name`).
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from policies.base import Scheduler, SchedulerParams
from policies.layered_prefill import LayeredPrefillParams, LayeredPrefillScheduler
from policies.orca import OrcaParams, OrcaScheduler
from policies.sarathi import SarathiParams, SarathiScheduler
from policies.sarathi_decode_maximal import SarathiDecodeMaximalParams, SarathiDecodeMaximalScheduler
from policies.static import StaticParams, StaticScheduler
from policies.vllm import VllmParams, VllmScheduler
from policies.vllm_v1 import VllmV1Params, VllmV1Scheduler

SCHEDULERS: dict[str, tuple[type[SchedulerParams], type[Scheduler]]] = {
    "static": (StaticParams, StaticScheduler),
    "orca": (OrcaParams, OrcaScheduler),
    "vllm": (VllmParams, VllmScheduler),
    "vllm_v1": (VllmV1Params, VllmV1Scheduler),
    "sarathi": (SarathiParams, SarathiScheduler),
    "sarathi_decode_maximal": (SarathiDecodeMaximalParams, SarathiDecodeMaximalScheduler),
    "layered_prefill": (LayeredPrefillParams, LayeredPrefillScheduler),
}
# Policies that page the KV cache block by block (prefix caching works with these).
PAGED_SCHEDULERS = ("vllm", "vllm_v1", "sarathi", "sarathi_decode_maximal", "layered_prefill")

SchedulerConfig = Annotated[
    Union[StaticParams, OrcaParams, VllmParams, VllmV1Params, SarathiParams, SarathiDecodeMaximalParams,
          LayeredPrefillParams],
    Field(discriminator="name"),
]


def make_scheduler(params: SchedulerParams) -> Scheduler:
    """A fresh scheduler for one replica from its validated parameters."""
    _, cls = SCHEDULERS[params.name]  # type: ignore[attr-defined]
    return cls(params)
