"""Checkpoint layouts: pure ``dict -> dict`` converters between x3dnet's names and the published ones.

Each foreign layout is an ordered rename table, one row per pattern with one example in the comment.
Placeholders: ``{k}`` our stage number (res2..res5), ``{j}`` the same stage counted from 1 (``k - 1``, as
pytorchvideo and mmaction2 count), ``{i}`` the block within the stage, ``{bn}`` one of BatchNorm's five
entries, ``{p}`` weight or bias. A third field ``True`` marks a foreign 1x1x1 conv weight (5-D) that is a
Linear weight (2-D) in x3dnet. Keys written or dropped on purpose are handled, and said, in the
converter functions below; any other key is an error that names it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError

NATIVE = "native"  # x3dnet's own key names
LAYOUTS = (NATIVE, "slowfast", "pytorchvideo", "mmaction2")
BN_EPS = 1e-5  # every BatchNorm of every implementation (spec section 1.6)
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

_SLOWFAST = (
    ("stem.conv_spatial.weight", "s1.pathway0_stem.conv_xy.weight"),  # (24, 3, 1, 3, 3)
    ("stem.conv_temporal.weight", "s1.pathway0_stem.conv.weight"),  # (24, 1, 5, 1, 1)
    ("stem.bn.{bn}", "s1.pathway0_stem.bn.{bn}"),
    ("res{k}.{i}.shortcut.weight", "s{k}.pathway0_res{i}.branch1.weight"),  # s2.pathway0_res0.branch1.weight
    ("res{k}.{i}.shortcut_bn.{bn}", "s{k}.pathway0_res{i}.branch1_bn.{bn}"),
    ("res{k}.{i}.conv_a.weight", "s{k}.pathway0_res{i}.branch2.a.weight"),
    ("res{k}.{i}.bn_a.{bn}", "s{k}.pathway0_res{i}.branch2.a_bn.{bn}"),
    ("res{k}.{i}.conv_b.weight", "s{k}.pathway0_res{i}.branch2.b.weight"),
    ("res{k}.{i}.bn_b.{bn}", "s{k}.pathway0_res{i}.branch2.b_bn.{bn}"),
    ("res{k}.{i}.se.fc1.weight", "s{k}.pathway0_res{i}.branch2.se.fc1.weight", True),  # (8, 54, 1, 1, 1)
    ("res{k}.{i}.se.fc1.bias", "s{k}.pathway0_res{i}.branch2.se.fc1.bias"),
    ("res{k}.{i}.se.fc2.weight", "s{k}.pathway0_res{i}.branch2.se.fc2.weight", True),
    ("res{k}.{i}.se.fc2.bias", "s{k}.pathway0_res{i}.branch2.se.fc2.bias"),
    ("res{k}.{i}.conv_c.weight", "s{k}.pathway0_res{i}.branch2.c.weight"),
    ("res{k}.{i}.bn_c.{bn}", "s{k}.pathway0_res{i}.branch2.c_bn.{bn}"),
    ("conv5.weight", "head.conv_5.weight"),  # (432, 192, 1, 1, 1)
    ("conv5_bn.{bn}", "head.conv_5_bn.{bn}"),
    ("fc1.weight", "head.lin_5.weight", True),  # (2048, 432, 1, 1, 1)
    ("fc2.{p}", "head.projection.{p}"),  # (400, 2048)
)

_PYTORCHVIDEO = (
    # create_x3d swaps the stem's names: conv_t holds the spatial conv, conv_xy the temporal one.
    ("stem.conv_spatial.weight", "blocks.0.conv.conv_t.weight"),  # (24, 3, 1, 3, 3)
    ("stem.conv_temporal.weight", "blocks.0.conv.conv_xy.weight"),  # (24, 1, 5, 1, 1)
    ("stem.bn.{bn}", "blocks.0.norm.{bn}"),
    ("res{k}.{i}.shortcut.weight", "blocks.{j}.res_blocks.{i}.branch1_conv.weight"),  # blocks.1.res_blocks.0
    ("res{k}.{i}.shortcut_bn.{bn}", "blocks.{j}.res_blocks.{i}.branch1_norm.{bn}"),  # absent when 24 -> 24
    ("res{k}.{i}.conv_a.weight", "blocks.{j}.res_blocks.{i}.branch2.conv_a.weight"),
    ("res{k}.{i}.bn_a.{bn}", "blocks.{j}.res_blocks.{i}.branch2.norm_a.{bn}"),
    ("res{k}.{i}.conv_b.weight", "blocks.{j}.res_blocks.{i}.branch2.conv_b.weight"),
    ("res{k}.{i}.bn_b.{bn}", "blocks.{j}.res_blocks.{i}.branch2.norm_b.0.{bn}"),  # norm_b = (BN, SE)
    ("res{k}.{i}.se.fc1.weight", "blocks.{j}.res_blocks.{i}.branch2.norm_b.1.block.0.weight", True),
    ("res{k}.{i}.se.fc1.bias", "blocks.{j}.res_blocks.{i}.branch2.norm_b.1.block.0.bias"),
    ("res{k}.{i}.se.fc2.weight", "blocks.{j}.res_blocks.{i}.branch2.norm_b.1.block.2.weight", True),
    ("res{k}.{i}.se.fc2.bias", "blocks.{j}.res_blocks.{i}.branch2.norm_b.1.block.2.bias"),
    ("res{k}.{i}.conv_c.weight", "blocks.{j}.res_blocks.{i}.branch2.conv_c.weight"),
    ("res{k}.{i}.bn_c.{bn}", "blocks.{j}.res_blocks.{i}.branch2.norm_c.{bn}"),
    ("conv5.weight", "blocks.5.pool.pre_conv.weight"),  # (432, 192, 1, 1, 1)
    ("conv5_bn.{bn}", "blocks.5.pool.pre_norm.{bn}"),
    ("fc1.weight", "blocks.5.pool.post_conv.weight", True),  # (2048, 432, 1, 1, 1)
    ("fc2.{p}", "blocks.5.proj.{p}"),  # (400, 2048)
)

_MMACTION2 = (
    ("stem.conv_spatial.weight", "backbone.conv1_s.conv.weight"),  # (24, 3, 1, 3, 3)
    ("stem.conv_temporal.weight", "backbone.conv1_t.conv.weight"),  # (24, 1, 5, 1, 1)
    ("stem.bn.{bn}", "backbone.conv1_t.bn.{bn}"),
    ("res{k}.{i}.shortcut.weight", "backbone.layer{j}.{i}.downsample.conv.weight"),  # backbone.layer1.0
    ("res{k}.{i}.shortcut_bn.{bn}", "backbone.layer{j}.{i}.downsample.bn.{bn}"),
    ("res{k}.{i}.conv_a.weight", "backbone.layer{j}.{i}.conv1.conv.weight"),
    ("res{k}.{i}.bn_a.{bn}", "backbone.layer{j}.{i}.conv1.bn.{bn}"),
    ("res{k}.{i}.conv_b.weight", "backbone.layer{j}.{i}.conv2.conv.weight"),
    ("res{k}.{i}.bn_b.{bn}", "backbone.layer{j}.{i}.conv2.bn.{bn}"),
    ("res{k}.{i}.se.fc1.weight", "backbone.layer{j}.{i}.se_module.fc1.weight", True),  # (8, 54, 1, 1, 1)
    ("res{k}.{i}.se.fc1.bias", "backbone.layer{j}.{i}.se_module.fc1.bias"),
    ("res{k}.{i}.se.fc2.weight", "backbone.layer{j}.{i}.se_module.fc2.weight", True),
    ("res{k}.{i}.se.fc2.bias", "backbone.layer{j}.{i}.se_module.fc2.bias"),
    ("res{k}.{i}.conv_c.weight", "backbone.layer{j}.{i}.conv3.conv.weight"),
    ("res{k}.{i}.bn_c.{bn}", "backbone.layer{j}.{i}.conv3.bn.{bn}"),
    ("conv5.weight", "backbone.conv5.conv.weight"),  # conv_5 lives in mmaction2's backbone
    ("conv5_bn.{bn}", "backbone.conv5.bn.{bn}"),
    ("fc1.weight", "cls_head.fc1.weight"),  # already 2-D (2048, 432) in mmaction2
    ("fc2.{p}", "cls_head.fc2.{p}"),  # (400, 2048)
)

_FIELDS = {
    "k": r"\d+",
    "j": r"\d+",
    "i": r"\d+",
    "bn": r"weight|bias|running_mean|running_var|num_batches_tracked",
    "p": r"weight|bias",
}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for n, p in enumerate(parts))
    return re.compile(regex + r"\Z")


class _Table:
    """A rename table compiled both ways."""

    def __init__(self, rows: Iterable[tuple]) -> None:
        self.rows = [(ours, theirs, bool(conv[0]) if conv else False) for ours, theirs, *conv in rows]
        self.ours = [(_pattern(ours), theirs, conv) for ours, theirs, conv in self.rows]
        self.theirs = [(_pattern(theirs), ours, conv) for ours, theirs, conv in self.rows]

    @staticmethod
    def _rename(key: str, patterns: list) -> tuple[str, bool] | None:
        for pattern, target, conv in patterns:
            match = pattern.match(key)
            if match:
                fields = match.groupdict()
                if "k" in fields:
                    fields["j"] = str(int(fields["k"]) - 1)
                if "j" in fields:
                    fields["k"] = str(int(fields["j"]) + 1)
                return target.format(**fields), conv
        return None

    def to_native(self, key: str) -> tuple[str, bool] | None:
        return self._rename(key, self.theirs)

    def from_native(self, key: str) -> tuple[str, bool] | None:
        return self._rename(key, self.ours)


_TABLES = {"slowfast": _Table(_SLOWFAST), "pytorchvideo": _Table(_PYTORCHVIDEO), "mmaction2": _Table(_MMACTION2)}


def detect_layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(layout, prefix)`` from a state dict's keys, or None when few of them fit any layout.

    The layout is the one that names the most keys (one renamed or extra key does not hide it: it is
    reported later, in the file's names, as missing or unexpected); the prefix (``module.`` from DDP,
    ``model.`` from SlowFast's PTVX3D wrapper, ...) is whatever every key carries before those names.
    """
    keys = list(keys)
    best: tuple[int, str | None, str] = (0, None, "")
    for prefix in _prefixes(keys):
        stripped = [k[len(prefix):] for k in keys]
        for layout in LAYOUTS:
            known = sum(is_known(k, layout) for k in stripped)
            if known == len(keys):
                return layout, prefix
            if known > best[0]:
                best = (known, layout, prefix)
    known, layout, prefix = best
    if layout is None or known < max(8, len(keys) // 2):
        return None
    return layout, prefix


def is_known(key: str, layout: str) -> bool:
    """Whether ``key`` (without prefix) is an X3D key of ``layout``."""
    if layout == NATIVE:  # every native key has a SlowFast name
        return _TABLES["slowfast"].from_native(key) is not None
    return _TABLES[layout].to_native(key) is not None


def _prefixes(keys: list[str]) -> list[str]:
    """The prefixes every key shares, cut at dots, longest first, and the empty one."""
    common = os.path.commonprefix(keys) if keys else ""
    return [common[: i + 1] for i in range(len(common) - 1, -1, -1) if common[i] == "."] + [""]


def to_native(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Rename a state dict of ``layout`` (prefix already stripped) to x3dnet's names."""
    if layout == NATIVE:
        return dict(state_dict)
    table = _TABLES[layout]
    out = {}
    for key, value in state_dict.items():
        renamed = table.to_native(key)
        if renamed is None:  # kept under its own name: strict loading reports it as unexpected
            out[key] = value
            continue
        name, conv = renamed
        out[name] = value.flatten(1) if conv and value.dim() == 5 else value
    return _restore_shortcut_bn(out) if layout == "pytorchvideo" else out


def from_native(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Rename an x3dnet state dict to ``layout``'s names and shapes."""
    if layout == NATIVE:
        return dict(state_dict)
    state_dict = dict(state_dict)
    if layout == "pytorchvideo":
        _fold_shortcut_bn(state_dict)
    table = _TABLES[layout]
    out = {}
    for key, value in state_dict.items():
        renamed = table.from_native(key)
        if renamed is None:
            raise CheckpointError(f"not an x3dnet key: {key}")
        name, conv = renamed
        out[name] = value[:, :, None, None, None] if conv and value.dim() == 2 else value
    return out


def foreign_name(key: str, layout: str) -> str:
    """What x3dnet's ``key`` is called in ``layout`` (for messages); the key itself if it has no name."""
    renamed = _TABLES[layout].from_native(key) if layout in _TABLES else None
    return renamed[0] if renamed else key


def name_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _square_shortcuts(state_dict: Mapping[str, Tensor]) -> list[str]:
    # pytorchvideo builds the shortcut BN only when the width changes (create_x3d), so the stride-2
    # shortcut of res2 (24 -> 24) is a bare conv there; SlowFast and mmaction2 have conv + BN.
    return [
        key[: -len("shortcut.weight")]
        for key, w in state_dict.items()
        if key.endswith(".shortcut.weight") and w.shape[0] == w.shape[1]
    ]


def _fold_shortcut_bn(state_dict: dict[str, Tensor]) -> None:
    """Remove res2's shortcut BN exactly, for pytorchvideo: scale the conv by s = gamma / sqrt(var + eps)
    and move the shift t = beta - mean * s into the residual branch's last BN bias; the two branches
    are summed before the ReLU and the shortcut conv has no bias to take t (spec section 3d)."""
    for block in _square_shortcuts(state_dict):
        bn = {p: state_dict.pop(f"{block}shortcut_bn.{p}").double() for p in _BN_PARAMS}
        scale = bn["weight"] / torch.sqrt(bn["running_var"] + BN_EPS)
        shift = bn["bias"] - bn["running_mean"] * scale
        conv = state_dict[f"{block}shortcut.weight"]
        state_dict[f"{block}shortcut.weight"] = (conv.double() * scale[:, None, None, None, None]).to(conv.dtype)
        bias = state_dict[f"{block}bn_c.bias"]
        state_dict[f"{block}bn_c.bias"] = (bias.double() + shift).to(bias.dtype)


def _restore_shortcut_bn(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Give res2's shortcut the BN pytorchvideo does not have, as an identity: weight 1, bias 0,
    mean 0, var 1 - eps, so it computes (x - 0) / sqrt(1 - eps + eps) * 1 + 0 = x (to float rounding).
    The entries go right after the shortcut conv, where the module registers them."""
    missing = {b for b in _square_shortcuts(state_dict) if f"{b}shortcut_bn.weight" not in state_dict}
    out = {}
    for key, value in state_dict.items():
        out[key] = value
        block = key[: -len("shortcut.weight")]
        if key.endswith(".shortcut.weight") and block in missing:
            ones = torch.ones(value.shape[0], dtype=value.dtype)
            out[f"{block}shortcut_bn.weight"] = ones
            out[f"{block}shortcut_bn.bias"] = torch.zeros_like(ones)
            out[f"{block}shortcut_bn.running_mean"] = torch.zeros_like(ones)
            out[f"{block}shortcut_bn.running_var"] = ones * (1 - BN_EPS)
            out[f"{block}shortcut_bn.num_batches_tracked"] = torch.tensor(0)
    return out
