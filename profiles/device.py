"""Device profiles (``profiles/devices/*.yaml``): the hardware a model is planned, built and
benchmarked for. Cross-field checks collect every problem (:mod:`edgekd.profiles.schema_base`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekd import targets
from edgekd.profiles.schema_base import (
    NAME,
    PRECISIONS,
    RELEASE,
    Block,
    Model,
    Peaks,
    Precision,
    Problems,
    ProfileError,
    nested,
)


class PowerMode(Model):
    """One nvpmodel power mode; figures left out are the profile's own."""

    name: str = Field(min_length=1, description="Mode name as `nvpmodel -q` prints it, e.g. '15W'.")
    watts: float = Field(
        gt=0,
        description="Module power budget in W; for uncapped MAXN modes, the highest budget the "
        "data sheet gives (see notes).",
    )
    id: int | None = Field(
        None,
        ge=0,
        description="nvpmodel id (`nvpmodel -m ID`). Ids differ between boards and JetPack "
        "releases: look a mode up by name first.",
    )
    memory_bandwidth_gbps: float | None = Field(
        None, gt=0, description="Peak memory bandwidth in this mode (GB/s), if not the profile's."
    )
    peak_tflops: Peaks | None = Field(
        None, description="Dense peak TFLOP/s (TOPS for int8) in this mode, if not the profile's."
    )
    notes: str = Field("", description="Where the mode's figures come from, caveats.")


class JetsonInfo(Model):
    """How to recognise the board and which software line the profile was written for."""

    module: str = Field(
        min_length=1,
        description="Substring of /proc/device-tree/model naming the module, "
        "e.g. 'NVIDIA Jetson Orin Nano'.",
    )
    jetpack: str = Field(pattern=RELEASE, description="JetPack release line, e.g. '6.x' or '6.2'.")
    l4t: str = Field(
        pattern=RELEASE,
        description="Jetson Linux release line (/etc/nv_tegra_release), e.g. '36.x'.",
    )


class TensorRTSettings(Block):
    """Engine-build settings; the exporter derives TensorRT optimisation profiles from them.

    Prefill shapes run from 1 to ``max_seq_len`` tokens, tuned for ``opt_seq_len`` (a TinyLLaVA
    prompt is ~730 image tokens plus the text); decode steps see 1 to ``max_past_len`` past tokens.
    """

    workspace_gb: float = Field(gt=0, description="Builder workspace limit in GB (tactic memory).")
    max_batch: int = Field(ge=1, description="Largest batch size the engine accepts.")
    opt_seq_len: int = Field(ge=1, description="Prefill length the kernels are tuned for.")
    max_seq_len: int = Field(ge=1, description="Longest prefill (prompt + image tokens).")
    max_past_len: int = Field(ge=1, description="Longest KV cache (past tokens) while decoding.")

    def problems(self) -> list[tuple[str, str]]:
        if self.opt_seq_len > self.max_seq_len:
            limit = f"max_seq_len ({self.max_seq_len})"
            return [("opt_seq_len", f"must be <= {limit}, got {self.opt_seq_len}")]
        return []


class DeviceProfile(Model):
    """A device edgekd exports to and benchmarks on.

    ``memory_bandwidth_gbps`` and ``peak_tflops`` are the figures in ``default_power_mode``; a power
    mode may override them. Peaks are dense (no structured sparsity), from vendor data sheets.
    """

    name: str = Field(pattern=NAME, description="Profile name; equals the YAML file's stem.")
    description: str = Field(min_length=1, description="One line: what the device is.")
    kind: Literal["jetson", "gpu", "cpu"] = Field(description="Device family.")
    arch: Literal["aarch64", "x86_64"] = Field(description="CPU architecture of the host.")
    memory_gb: float = Field(gt=0, description="Memory a model can use, in GB (physical capacity).")
    unified_memory: bool = Field(
        False, description="True when CPU and GPU share one DRAM (Jetson): memory_gb is shared."
    )
    memory_bandwidth_gbps: float = Field(gt=0, description="Peak DRAM bandwidth in GB/s.")
    peak_tflops: Peaks = Field(
        default_factory=dict,
        description="Dense peak per precision: TFLOP/s for floats, TOPS for int8.",
    )
    supported_precisions: list[Precision] = Field(
        min_length=1, description="Precisions edgekd may export for this device."
    )
    preferred_precision: Precision = Field(description="Precision used when none is asked for.")
    preferred_target: str = Field(
        description="Export target used when none is asked for (a registered target)."
    )
    power_modes: list[PowerMode] = Field(
        default_factory=list, description="nvpmodel modes (Jetson); empty for other devices."
    )
    default_power_mode: str | None = Field(
        None, description="Mode the profile's figures describe; names one of power_modes."
    )
    jetson: JetsonInfo | None = Field(None, description="Required iff kind is 'jetson'.")
    tensorrt: TensorRTSettings | None = Field(None, description="TensorRT engine-build settings.")
    notes: str = Field("", description="Sources, derived figures and caveats.")

    @model_validator(mode="after")
    def _check(self) -> DeviceProfile:
        problems = self._kind_problems() + self._precision_problems() + self._power_mode_problems()
        problems += nested("tensorrt", self.tensorrt)
        if problems:
            raise Problems(problems)
        return self

    def _kind_problems(self) -> list[tuple[str, str]]:
        out = []
        jetson = self.kind == "jetson"
        if jetson and self.jetson is None:
            out.append(("jetson", "required when kind is 'jetson' (module, jetpack, l4t)"))
        if not jetson and self.jetson is not None:
            out.append(("jetson", f"only allowed when kind is 'jetson', got kind '{self.kind}'"))
        if jetson and self.arch != "aarch64":
            out.append(("arch", f"Jetson boards are 'aarch64', got '{self.arch}'"))
        if jetson and not self.unified_memory:
            out.append(("unified_memory", "must be true for Jetson (CPU and GPU share one DRAM)"))
        out += _target_problems(self.kind, self.preferred_target)
        if self.kind == "cpu" and self.tensorrt is not None:
            out.append(("tensorrt", "only for kind 'jetson' or 'gpu'"))
        if self.tensorrt is not None and self.tensorrt.workspace_gb >= self.memory_gb:
            out.append(
                (
                    "tensorrt.workspace_gb",
                    f"must be < memory_gb ({self.memory_gb:g}), got {self.tensorrt.workspace_gb:g}",
                )
            )
        return out

    def _precision_problems(self) -> list[tuple[str, str]]:
        supported = self.supported_precisions
        unsupported = f"is not in supported_precisions ({', '.join(dict.fromkeys(supported))})"
        twice = [p for p in PRECISIONS if supported.count(p) > 1]
        out = [("supported_precisions", f"lists '{p}' twice") for p in twice]
        if self.preferred_precision not in supported:
            out.append(("preferred_precision", f"'{self.preferred_precision}' {unsupported}"))
        tables = [("peak_tflops", self.peak_tflops)]
        for i, mode in enumerate(self.power_modes):
            tables.append((f"power_modes.{i}.peak_tflops", mode.peak_tflops or {}))
        for key, table in tables:
            out += [(f"{key}.{p}", f"'{p}' {unsupported}") for p in table if p not in supported]
        return out

    def _power_mode_problems(self) -> list[tuple[str, str]]:
        names = [m.name for m in self.power_modes]
        ids = [m.id for m in self.power_modes if m.id is not None]
        valid = ", ".join(dict.fromkeys(names)) or "none, power_modes is empty"
        out = [
            ("power_modes", f"name '{n}' appears twice")
            for n in sorted(set(names))
            if names.count(n) > 1
        ]
        out += [
            ("power_modes", f"id {i} appears twice") for i in sorted(set(ids)) if ids.count(i) > 1
        ]
        if self.kind == "jetson" and not names:
            out.append(("power_modes", "a Jetson profile lists its nvpmodel modes"))
        default = self.default_power_mode
        if names and default is None:
            out.append(("default_power_mode", f"required with power_modes; one of: {valid}"))
        elif default is not None and default not in names:
            out.append(("default_power_mode", f"'{default}' is not a power mode (valid: {valid})"))
        return out

    def power_mode(self, name: str | None = None) -> PowerMode | None:
        """The named power mode, or the default one (None when the device has no modes).

        Raises:
            ProfileError: ``name`` is not one of the profile's modes.
        """
        name = name or self.default_power_mode
        if name is None:
            return None
        for mode in self.power_modes:
            if mode.name == name:
                return mode
        valid = ", ".join(m.name for m in self.power_modes) or "none"
        raise ProfileError(f"unknown power mode '{name}' for device '{self.name}'; valid: {valid}")

    def bandwidth_gbps(self, mode: str | None = None) -> float:
        """Peak memory bandwidth in GB/s in ``mode`` (default: the default power mode)."""
        selected = self.power_mode(mode)
        if selected is not None and selected.memory_bandwidth_gbps is not None:
            return selected.memory_bandwidth_gbps
        return self.memory_bandwidth_gbps

    def peak(self, precision: str, mode: str | None = None) -> float | None:
        """Dense peak TFLOP/s (TOPS for int8) for ``precision`` in ``mode``; None if not listed."""
        selected = self.power_mode(mode)
        if selected is not None and selected.peak_tflops is not None:
            return selected.peak_tflops.get(precision)  # type: ignore[call-overload]
        return self.peak_tflops.get(precision)  # type: ignore[call-overload]


def _target_problems(kind: str, name: str) -> list[tuple[str, str]]:
    """``preferred_target`` must be a registered target that runs on this kind of device."""
    if name not in targets.TARGETS:
        valid = ", ".join(targets.names())
        return [("preferred_target", f"unknown target '{name}'; valid: {valid}")]
    runs_on = targets.get(name).devices
    if kind == "cpu" and "cpu" not in runs_on:
        usable = [t for t in targets.names() if "cpu" in targets.get(t).devices]
        return [
            (
                "preferred_target",
                f"{name} needs an NVIDIA GPU; use " + " or ".join(f"'{t}'" for t in usable),
            )
        ]
    return []
