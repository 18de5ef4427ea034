"""``EngineConfig``: how an engine does I/O, its own module so that the probe and the engine
both use it without importing each other."""

from __future__ import annotations

import dataclasses

from fxoffload.options import IO_OPTIONS, check_fields, config_fields

EngineConfig = dataclasses.make_dataclass(
    "EngineConfig",
    config_fields(IO_OPTIONS),
    frozen=True,
    namespace={
        "__doc__": "How an engine does I/O: the I/O options of ``fxoffload.config``, which "
        "documents each and holds its default, checked as ``Options`` checks them.",
        "__post_init__": check_fields,
        "__module__": __name__,
    },
)
