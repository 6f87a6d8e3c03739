"""Reading a component's config.json: every key is honoured or refused by name, never silently ignored.

Each config class lists the keys it honours (IMPLEMENTED) and those it refuses unless they hold the reference's
default (REFUSED: key -> the values that change nothing). `ConfigFile` checks a parsed config.json against both lists
(private `_...` keys are the library's bookkeeping) and reads values with their types checked, so that a mistake in
the file is one line naming the file, the key and the value, not a traceback.
"""
import json
import math

import torch.nn.functional as F

from .errors import UserError

# The activation functions of diffusers' act_fn (get_activation).
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "relu": F.relu, "gelu": F.gelu}


KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def show(value) -> str:
    return json.dumps(value)


class ConfigFile:
    """One parsed config.json, checked key by key on construction; its getters check the values' types."""

    def __init__(self, values: dict, where, implemented: set[str], refused: dict[str, tuple]):
        if not isinstance(values, dict):
            raise UserError(f"{where}: a config must be a JSON object, not {show(values)[:40]}")
        self.values, self.where = values, where
        for key, value in values.items():
            if key.startswith("_") or key in implemented:
                continue
            if key not in refused:
                raise UserError(f"{where}: unknown key {key!r} ({show(value)[:40]}): sdlite cannot honour it")
            if value not in refused[key]:
                allowed = " or ".join(show(v) for v in refused[key])
                raise UserError(f"{where}: {key} = {show(value)[:40]} is not supported by sdlite (only {allowed})")

    def fail(self, key: str, wanted: str):
        if key not in self.values:
            raise UserError(f"{self.where}: the key {key!r} is missing ({wanted})")
        raise UserError(f"{self.where}: {key} must be {wanted}, not {show(self.values[key])[:40]}")

    def get(self, key: str, default, kind: type):
        """The value of `key` (`default` if absent): an int, a finite float, a bool or a str (an int does for a
        float)."""
        value = self.values.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(key, KINDS[kind])
        if kind is float and not math.isfinite(value):
            self.fail(key, KINDS[float])
        return value

    def choice(self, key: str, default: str, options) -> str:
        """A string that must be one of `options`."""
        value = self.get(key, default, str)
        if value not in options:
            raise UserError(f"{self.where}: {key} = {show(value)[:40]} is not supported by sdlite "
                            f"(only {', '.join(options)})")
        return value

    def optional(self, key: str, kind: type):
        """The value of `key`, or None if absent or null."""
        return None if self.values.get(key) is None else self.get(key, None, kind)

    def list_of(self, key: str, default, kind: type, length: int | None = None) -> tuple:
        """A list of `kind` (of `length` items if given) as a tuple. Ints do for floats."""
        value = self.values.get(key, default)
        what = f"a list of {length or 'some'} values, each {KINDS[kind]}"
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length) or not value:
            self.fail(key, what)
        kinds = (int, float) if kind is float else kind
        if not all(isinstance(v, kinds) and not isinstance(v, bool) or kind is bool and isinstance(v, bool)
                   for v in value) or (kind is float and not all(math.isfinite(v) for v in value)):
            self.fail(key, what)
        return tuple(kind(v) for v in value)

    def per_level(self, key: str, default, kind: type, levels: int) -> tuple:
        """One value for every level: a list of `levels` values, or a single one that holds at every level."""
        value = self.values.get(key, default)
        if isinstance(value, (list, tuple)):
            return self.list_of(key, default, kind, levels)
        return (self.get(key, default, kind),) * levels
