"""The device mesh a pipeline runs on: axes ("data", "model"), written `data=D,model=M`.

    MeshSpec.parse("data=4,model=2").resolve(devices=8)    # -> (4, 2)
    MeshSpec().resolve(devices=8)                           # -> (8, 1): every device on data

`data` splits each batch's rows across devices (each device runs the one-device program on its
rows: no collective in the sampling loop); `model` splits the transformer's stacked block weights
FSDP-style (each large leaf on an axis divisible by `model`, gathered one layer at a time where it
is used), for cards whose memory cannot hold the weights; the rows of a `data` group are not split.
An axis left out fills the devices (`data=4` on 8 devices is data=4,model=2). Left out entirely,
`model` is the smallest divisor of the device count whose share of the weights fits the device
memory (`choose_model_size`), `data` the rest.

JAX-free: the workflow parses and checks `--mesh` / FLOWGEN_MESH with it before anything loads;
`placement.py` builds the JAX mesh. A mesh is recorded with each result (its layout), not hashed.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowgen.engine.errors import EngineInputError

AXES = ("data", "model")
ENV = "FLOWGEN_MESH"
FREE_SHARE = 0.8  # the share of a device's memory the weights may take (the rest: activations, caches)


def _refuse(text: str, problem: str) -> EngineInputError:
    return EngineInputError(f"mesh {text!r}: {problem}")


@dataclass(frozen=True)
class MeshSpec:
    """Axis sizes as asked (None: filled in by `resolve`)."""

    data: int | None = None
    model: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> MeshSpec:
        """`data=D,model=M` (either may be left out; empty or None: both). One-line EngineInputError
        naming the text and what is allowed for anything else."""
        if text is None or not text.strip():
            return cls()
        sizes: dict[str, int] = {}
        for part in text.split(","):
            name, sep, value = (s.strip() for s in part.partition("="))
            if name not in AXES:
                raise _refuse(text, f"unknown axis {name!r} (allowed: {', '.join(AXES)}, as data=D,model=M)")
            if name in sizes:
                raise _refuse(text, f"axis {name} given twice")
            if not sep or not value.isdigit() or int(value) < 1:
                raise _refuse(text, f"{name} must be a whole number of devices >= 1, as {name}=2")
            sizes[name] = int(value)
        return cls(**sizes)

    @property
    def text(self) -> str:
        """As written: `data=4,model=2` (axes left out omitted; "" for the automatic mesh)."""
        return ",".join(f"{name}={size}" for name, size in zip(AXES, (self.data, self.model)) if size is not None)

    def resolve(self, devices: int, model_size: int | None = None) -> tuple[int, int]:
        """(data, model) over `devices` devices; `model_size` fills `model` when neither axis was
        given (default 1). Raises EngineInputError when the asked sizes do not fit the devices."""
        text = self.text
        for name, size in (("data", self.data), ("model", self.model)):
            if size is not None and size > devices:
                raise _refuse(text, f"{name}={size} needs {size} devices; this machine has {devices}")
        if self.data is None and self.model is None:
            model = model_size or 1
            return devices // model, model
        if self.data is not None and self.model is not None:
            if self.data * self.model != devices:
                raise _refuse(
                    text,
                    f"data x model = {self.data * self.model} devices, but this machine has "
                    f"{devices}: the axes must use every device",
                )
            return self.data, self.model
        given, name = (self.data, "data") if self.data is not None else (self.model, "model")
        assert given is not None
        if devices % given:
            raise _refuse(
                text,
                f"{name}={given} does not divide this machine's {devices} devices (allowed: a divisor of {devices})",
            )
        other = devices // given
        return (given, other) if name == "data" else (other, given)


def resolved_text(data: int, model: int) -> str:
    """How a resolved mesh is recorded: `data=8,model=1`."""
    return f"data={data},model={model}"


def choose_model_size(devices: int, weight_bytes: int, device_bytes: int | None, sharded_share: float = 1.0) -> int:
    """The smallest divisor M of `devices` such that a device holds its 1/M of the shardable
    weights plus the rest within FREE_SHARE of its memory; 1 when the memory is unknown (CPU).
    sharded_share: the part of `weight_bytes` that `model` splits (the stacked transformer blocks)."""
    if not device_bytes or weight_bytes <= 0:
        return 1
    budget = FREE_SHARE * device_bytes
    fixed = weight_bytes * (1.0 - sharded_share)
    for size in range(1, devices + 1):
        if devices % size == 0 and fixed + weight_bytes * sharded_share / size <= budget:
            return size
    return devices
