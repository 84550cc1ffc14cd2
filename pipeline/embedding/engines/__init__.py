"""Engines: where the unit of work (``worker.embed_one_shard``) runs. One registry, as the decoders and the index
kinds have: each module of this package is one engine (``local.py`` -> ``"local"``) holding ``ENGINE = Engine(...)``,
found by its name (``pkgutil``, no list to keep) and imported on first use.

Every engine has the one call ``engine.run(job, summary) -> urls left unfinished``: ``job`` (an :class:`EngineJob`)
says what to embed, where and with what; each shard's outcome goes into ``summary`` through
``summary.add(url, **worker.outcome(rec, reason))``. Engines import the worker, never the runner. What the runner
needs to know of an engine is asked of its attributes, never of its name (``tests/test_architecture.py``
checks that no code outside this package compares one).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

from ...errors import UserError
from ...registry import Registry
from ..options import EmbedConfig, EmbedSummary

if TYPE_CHECKING:  # torch comes with an engine's run, not with the registry (option checks, the CLI's choices)
    from ...model.backbones import Backbone
    from ...model.compile import Extractor
    from ..progress import EmbedProgress
    from ..run_folder import RunState

log = logging.getLogger(__name__)

# The engine that runs one process per device: what --devices chooses when it names several, and the child that
# embeds shards whose last attempt killed its process (a native crash costs the shard, not the run).
DEVICES = "devices"


@dataclass(frozen=True)
class EngineJob:
    """What a run hands an engine.

    Attributes:
        pending: the shards to embed, claimed by this run (each reported once in the summary, unless left).
        names: each shard's output name (``url -> name``), as the run folder's records name it.
        state: the run folder; the worker commits each shard there.
        cfg: the validated options.
        devices: where the model runs: the ``--devices`` list, else ``[cfg.device]``.
        progress: the run's progress bar (``update(images)``, ``shard_finished(summary)``), or None.
        model: the backbone and extractor already prepared in this process (for an engine that
            ``runs_model_here``), or None: the engine prepares its own, once per process.
        respawns: dead worker processes replaced per device (None: the engine's default).
    """

    pending: list[str]
    names: dict[str, str]
    state: "RunState"
    cfg: EmbedConfig
    devices: list[str]
    progress: "EmbedProgress | None" = None
    model: "tuple[Backbone, Extractor] | None" = None
    respawns: int | None = None


@dataclass(frozen=True)
class Engine:
    """Everything the runner asks of one engine.

    Attributes:
        name: the ``--engine`` value; the module is named after it.
        run: ``(job, summary) -> urls``: embed ``job.pending``, report each shard through
            ``summary.add(url, **worker.outcome(rec, reason))``, return the shards left unfinished (the runner
            hands them to the contained child; an engine that decides every shard returns ``[]``).
        about: what it is, in a few words (for messages).
        runs_model_here: the model runs in this process: the runner prepares it (``job.model``) and keeps the
            shards that killed a process away from it (they go to the contained child).
        places_work_itself: it chooses its own devices (a cluster scheduler): ``--devices`` is refused.
        takes_devices: it runs one process per entry of ``job.devices``.
    """

    name: str
    run: Callable[[EngineJob, EmbedSummary], list[str]]
    about: str
    runs_model_here: bool = False
    places_work_itself: bool = False
    takes_devices: bool = False


ENGINES: Registry[Engine] = Registry(__name__, "ENGINE", "engine")
engine_names = ENGINES.names  # every engine's name (none imported)

get_engine = ENGINES.get  # the engine called NAME (imported on first use); an unknown NAME lists the names


def engine_for(name: str, devices: Sequence[str] | None) -> Engine:
    """The engine of a run: ``--engine``'s, or the devices engine when ``--devices`` names several devices (the
    user never needs ``--engine devices``). Checked before anything is touched, like the other options."""
    engine = get_engine(name)
    if devices and engine.places_work_itself:
        raise UserError(f"--engine {name} places work itself ({engine.about}); drop --devices")
    if devices and len(devices) > 1 and not engine.takes_devices:
        return get_engine(DEVICES)
    return engine


def contain(job: EngineJob, summary: EmbedSummary) -> list[str]:
    """Embed shards whose last attempt killed its process one at a time in a child process (the devices engine,
    one worker on the run's device, decoding in its own threads: a crash in a decoder is then the child's death,
    seen here). A shard that kills the child again is retried once in a new child, then recorded failed with the
    signal; the others complete."""
    if not job.pending:
        return []
    log.warning("embedding %d shard(s) in a child process, as their last attempt died: %s", len(job.pending),
                ", ".join(job.pending[:3]) + (", ..." if len(job.pending) > 3 else ""))
    child = replace(job, cfg=replace(job.cfg, workers=0), devices=[job.cfg.device], model=None,
                    respawns=2 * len(job.pending))
    return get_engine(DEVICES).run(child, summary)
