"""Guides (variational posteriors) of the IODINE model, as plug-ins.

Every guide follows the contract of `base.Guide` and is registered under its ``kind``
(the value of ``guide.kind`` in a configuration). The built-in ones are IODINE's
iterative amortized posterior (``iterative``), the one-shot amortized VAE baseline
(``amortized``) and slot attention followed by optional refinement steps
(``slot_attention``); `register_guide` adds another without editing any other module.

Importing this package costs nothing (the command line lists the kinds at start-up);
`guide_class` imports a guide's module when it is first needed.

A guide may declare its own configuration section (``[slot_attention]`` in a TOML file,
``"slot_attention.iters"`` in overrides, a table of its own in checkpoints) with three
class attributes: ``section`` (its name) and ``Section`` (a dataclass of its fields, each
declared with its default and its rule by `iodine_pyro.fields.ruled`).
`guide_sections` names them without importing the built-in guides' modules.
"""

from __future__ import annotations

import importlib

# kind -> "module:class" of the built-in guides, imported on first use
_BUILTIN = {"iterative": "iterative:IterativeGuide", "amortized": "amortized:AmortizedGuide",
            "slot_attention": "slot_attention:SlotAttentionGuide"}
_BUILTIN_SECTIONS = {"slot_attention": "slot_attention"}     # section -> the built-in kind declaring it
_REGISTERED: dict[str, type] = {}
ITERATIVE = "iterative"        # the default kind: IODINE's guide

__all__ = ["ITERATIVE", "build_guide", "guide_class", "guide_kinds", "guide_sections", "register_guide"]


def register_guide(cls: type) -> type:
    """Register a `base.Guide` subclass under its ``kind`` (usable as a class decorator)."""
    if not getattr(cls, "kind", ""):
        raise ValueError(f"{cls.__name__} has no kind")
    _REGISTERED[cls.kind] = cls
    return cls


def guide_kinds() -> list[str]:
    """The registered kinds, built-in first."""
    return [*_BUILTIN, *(k for k in _REGISTERED if k not in _BUILTIN)]


def guide_sections() -> dict[str, str]:
    """The configuration sections guides declare: {section name: kind}."""
    out = dict(_BUILTIN_SECTIONS)
    out.update({cls.section: kind for kind, cls in _REGISTERED.items() if getattr(cls, "section", "")})
    return out


def guide_class(kind: str) -> type:
    """The guide class registered as `kind`; ValueError naming the kinds otherwise."""
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    if kind not in _BUILTIN:
        raise ValueError(f"unknown guide {kind!r}; choose from {', '.join(guide_kinds())}")
    module, name = _BUILTIN[kind].split(":")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    _REGISTERED.setdefault(kind, cls)
    return cls


def build_guide(model, cfg):
    """The guide of configuration `cfg` for `model`."""
    return guide_class(cfg.guide.kind)(model, cfg)
