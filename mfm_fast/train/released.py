"""The released MFM architecture on timm models, and --init: weights from mfm_fast or released checkpoints.

create_classifier builds the fine-tuning model: timm.create_model(name, num_classes=K, global_pool="avg") for
ViTs (mean over the patch tokens, then fc_norm, as the released VisionTransformer with USE_MEAN_POOLING).

The released ViT (Jiahao000/MFM models/vision_transformer.py, BEiT-style) is timm's VisionTransformer with
LayerNorm eps 1e-6, no layer scale, a learned pos_embed with a cls slot and qkv = Linear(D, 3D, bias=False) plus
learnable q_bias, v_bias: in timm terms attn.qkv.bias = cat(q_bias, 0, v_bias) with the key third held at 0
(pin_key_bias). Its initialisation is apply_released_vit_init.

load_init reads, with torch.load(weights_only=True) only (never a full unpickle):
  mfm_fast pre-training checkpoint.pth (MFM or FOLK)   {"model": {encoder.*, head.*[, dino_head.*]}, "args", "step"}
  mfm_fast encoder.pth                                  the timm encoder's state dict
  released MFM pre-training checkpoint                  {"model": {encoder.*, decoder.*}, "config", ...}
  released MFM fine-tuned checkpoint                    {"model": {blocks.*.attn.q_bias, fc_norm.*, head.*, ...}}
  python -m mfm_fast.finetune checkpoint                {"kind": "finetune", "model": classifier weights, "args"}
Released checkpoints hold their yacs config (yacs.config.CfgNode): an inert stand-in (an OrderedDict) takes its
place, and any other Python object in a file becomes an inert placeholder; the weights are all that is read.
"""

from __future__ import annotations

import collections
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..cli import ArgError
from .checkpoint import read_checkpoint


def is_vit(net: nn.Module) -> bool:
    """A timm VisionTransformer-like model (patch_embed and prefix tokens)."""
    return hasattr(net, "patch_embed") and hasattr(net, "num_prefix_tokens")


# ---- the classifier and the released initialisation ---------------------------------------------------

def create_timm_model(name: str, img_size: int, **kwargs) -> nn.Module:
    """timm.create_model(name, pretrained=False, img_size=img_size, **kwargs), img_size only where the model takes
    one (CNNs do not)."""
    import timm
    try:
        return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, pretrained=False, **kwargs)


def create_classifier(model: str, num_classes: int, img_size: int, drop_path: float = 0.0,
                      released_init: bool = False, global_pool: str = "avg", **model_kwargs) -> nn.Module:
    """timm classifier `model` with `num_classes` outputs for img_size px inputs. ViTs: global_pool "avg" = mean
    over the patch tokens then fc_norm (the released fine-tuning model; the encoder's final norm is unused),
    "token" = the cls token after the final norm (every pre-trained encoder tensor is used).

    released_init (fine-tuning's ViT presets): a ViT gets the released fine-tuning initialisation and its key
    bias pinned at 0; other models keep timm's. model_kwargs go to timm.create_model (e.g. embed_dim, depth)."""
    net = create_timm_model(model, img_size, num_classes=num_classes, drop_path_rate=drop_path,
                            global_pool=global_pool, **model_kwargs)
    if released_init and is_vit(net):
        apply_released_vit_init(net, pretraining=False)
        pin_key_bias(net)
    return net


def apply_released_vit_init(vit: nn.Module, pretraining: bool) -> nn.Module:
    """The released VisionTransformer's initialisation, in place, on a timm VisionTransformer (returns it).

    w ~ N(0, .02^2) truncated to [-2, 2] (timm's trunc_normal_ bounds are absolute: effectively untruncated) for
    pos_embed, cls_token, then every Linear / Conv2d weight in module order (biases 0, LayerNorm 1 / 0); then
    block i's attn.proj and mlp.fc2 weights / sqrt(2 (i + 1)); head weight and bias x 0.001. The draws follow
    the released constructor's order (its head weight is drawn twice: once before the module sweep, once in it).
    pretraining: VisionTransformerForMFM's variant: truncated to [-.02, .02] (+-1 std), no head (num_classes 0)."""
    from timm.layers import trunc_normal_
    std = 0.02
    bounds = dict(a=-std, b=std) if pretraining else {}

    def draw(t: torch.Tensor) -> None:
        trunc_normal_(t, std=std, **bounds)

    head = vit.head if isinstance(getattr(vit, "head", None), nn.Linear) else None
    with torch.no_grad():
        for token in (vit.pos_embed, vit.cls_token):
            if token is not None:
                draw(token)
        if head is not None:
            draw(head.weight)
        for m in vit.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                draw(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for i, block in enumerate(vit.blocks):
            block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
        if head is not None:
            head.weight.mul_(0.001)
            head.bias.mul_(0.001)
    return vit


def _key_slice(bias: torch.Tensor) -> slice:
    d = bias.shape[0] // 3
    return slice(d, 2 * d)


def _zero_key_grad(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[_key_slice(grad)] = 0
    return grad


def pin_key_bias(vit: nn.Module) -> nn.Module:
    """Set the key third of every attn.qkv.bias (3D,) to 0 and keep it there (returns vit).

    The released model has no key bias (qkv bias = cat(q_bias, 0, v_bias)). A key bias b_k adds q_i . b_k to
    every logit of query i alike, which softmax ignores: its gradient is 0 up to rounding, and AdamW would turn
    that rounding noise into lr-sized steps. A gradient hook zeroes the key slice, so Adam's moments and
    update there stay exactly 0 (biases get no weight decay in our parameter groups)."""
    for block in vit.blocks:
        bias = block.attn.qkv.bias
        if bias is None or getattr(bias, "_mfm_key_pinned", False):
            continue
        with torch.no_grad():
            bias[_key_slice(bias)] = 0
        bias.register_hook(_zero_key_grad)
        bias._mfm_key_pinned = True
    return vit


def _rezero_pinned_key_bias(net: nn.Module) -> None:
    """After loading: a pinned key bias back to 0 (softmax ignores it, so the function is unchanged)."""
    with torch.no_grad():
        for p in net.parameters():
            if getattr(p, "_mfm_key_pinned", False):
                p[_key_slice(p)] = 0


# ---- reading a file ---------------------------------------------------------------------------------

class _ReleasedConfig:
    """Stand-in for the released checkpoints' yacs.config.CfgNode (a dict subclass): read as an OrderedDict."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


class _Placeholder:
    """Stand-in for any other Python object in a file: built from nothing, its state ignored."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


STAND_INS = {"yacs.config.CfgNode": _ReleasedConfig}
EXPECTED = ("expected an mfm_fast checkpoint.pth / encoder.pth, a released MFM checkpoint or a checkpoint of "
            "python -m mfm_fast.finetune")


def _stand_ins(path) -> list:
    """(stand-in, name) for every non-tensor global the file's pickle names (the released yacs config, ...)."""
    return [(STAND_INS.get(name, _Placeholder), name)
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]


# ---- what a file holds --------------------------------------------------------------------------------

def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: dict, prefix: str) -> Tuple[dict, dict]:
    """(keys under prefix without it, the other keys): {k[len(prefix):]: v}, {k: v}."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner, {k: v for k, v in state.items() if not k.startswith(prefix)}


def _what(obj) -> str:
    """A few words on what an object of no known kind holds."""
    if isinstance(obj, dict):
        keys = list(obj)
        shown = ", ".join(map(str, keys[:5])) + (", ..." if len(keys) > 5 else "")
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        return f"a dict of {len(keys)} entries ({shown}; {tensors} of them tensors)"
    return f"a {type(obj).__name__}"


def identify(ckpt) -> Tuple[Optional[str], str, dict, dict, dict]:
    """(kind, description, weights, other, saved args) of a loaded file; kind None if unknown.

    weights: the model's tensors named as in the model (the encoder. prefix removed, released q_bias / v_bias
    still separate); other: the file's tensors outside the model (decoder, MFM head, ...) under their names in
    the file; saved args: the mfm_fast run's arguments (empty for released files)."""
    if _is_state_dict(ckpt):
        return "mfm_fast_encoder", "a timm state dict (mfm_fast encoder.pth)", ckpt, {}, {}
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not _is_state_dict(model):
        return None, _what(ckpt), {}, {}, {}
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if ckpt.get("kind") == "finetune":
        return "mfm_fast_finetune", "an mfm_fast finetune checkpoint", model, {}, args
    if any(k.startswith("encoder.") for k in model):
        encoder, other = _strip(model, "encoder.")
        if args and "step" in ckpt:
            method = str(args.get("method", "mfm")).upper()
            what = f"an mfm_fast {method} pre-training checkpoint (encoder.*)"
            return "mfm_fast_pretrain", what, encoder, other, args
        return "released_pretrain", "a released MFM pre-training checkpoint (encoder.*)", encoder, other, {}
    return "released_finetune", "a released MFM fine-tuned checkpoint", model, {}, {}


def from_released(state: dict) -> Tuple[dict, List[str]]:
    """Released ViT names -> timm's: blocks.i.attn.{q_bias, v_bias} -> attn.qkv.bias = cat(q_bias, 0, v_bias);
    gamma_1 / gamma_2 (layer scale) -> ls1.gamma / ls2.gamma. Returns (state, the file's keys merged away)."""
    out, merged = dict(state), []
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        base = key[:-len("q_bias")]
        if base + "v_bias" not in state:
            continue
        q, v = out.pop(key), out.pop(base + "v_bias")
        out[base + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        merged += [key, base + "v_bias"]
    for old, new in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
        for key in [k for k in out if k.endswith("." + old)]:
            out[key[:-len(old)] + new] = out.pop(key)
    return out, merged


VIT_NAMES = {(192, 12, 16): "vit_tiny_patch16_224", (384, 12, 16): "vit_small_patch16_224",
             (768, 12, 16): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224"}
RESNET_NAMES = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}


def guess_architecture(state: dict, saved_args: dict) -> Optional[str]:
    """What model the weights look like: the run's --model, else a ViT / ResNet read from the shapes."""
    if saved_args.get("model"):
        return f"{saved_args['model']} (its run's --model)"
    if "patch_embed.proj.weight" in state:
        w = state["patch_embed.proj.weight"]
        width, patch = w.shape[0], w.shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        name = VIT_NAMES.get((width, depth, patch))
        return f"a ViT of width {width}, depth {depth}, patch {patch}" + (f" ({name})" if name else "")
    if any(k.startswith("layer1.0.") for k in state):
        layers = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
        name = RESNET_NAMES.get((layers, bottleneck))
        return (f"a ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {list(layers)}"
                + (f" ({name})" if name else ""))
    return None


def _model_name(net: nn.Module) -> str:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(net).__name__


def _classifier_prefixes(net: nn.Module) -> Tuple[str, ...]:
    """The classifier's own modules, fresh when a file lacks them: the head (timm's `classifier`), fc_norm."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return heads + ("fc_norm",)


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# ---- --init -----------------------------------------------------------------------------------------

def _size_error(flag: str, path, kind: str, net: nn.Module, have: torch.Size, img_size: int) -> ArgError:
    """pos_embed token counts differ: the image size the file was trained at, for the patch size."""
    patch = net.patch_embed.patch_size[0]
    tokens = have[1] - net.num_prefix_tokens
    side = math.isqrt(tokens)
    when = "fine-tuned" if kind.endswith("finetune") else "pre-trained"
    at = f"{side * patch} px" if side * side == tokens else f"{tokens} patch tokens"
    fix = f": pass --img-size {side * patch}" if side * side == tokens else ""
    return ArgError(f"{flag}: {path} was {when} at {at} ({tokens} patch tokens of {patch} px), this run is "
                    f"{img_size} px{fix}")


def _arch_error(flag: str, path, net: nn.Module, problem: str, guess: Optional[str]) -> ArgError:
    looks = f"; the file holds {guess}" if guess else ""
    return ArgError(f"{flag}: {path} does not fit {_model_name(net)}: {problem}{looks}")


def load_init(path, net: nn.Module, *, img_size: int, flag: str = "--init") -> dict:
    """Load the weights of the file at `path` into the classifier `net` (in place); returns the report {flag,
    path, kind, what, loaded (number of net tensors set), left_out (the file's tensors not loaded, under the
    file's names), fresh (the net's tensors kept as initialised)}.

    Every net tensor is loaded except the classifier's own (head, fc_norm: fresh when absent or when the class
    count differs); everything else must be in the file with the net's shape. ArgError naming `flag`, one line:
    no such file, not a torch file, no known kind, architecture mismatch (the first key, both shapes, what the
    file looks like), image size mismatch (pos_embed: the size it was trained at). A pinned key bias
    (pin_key_bias) is set back to 0 after loading."""
    ckpt = read_checkpoint(path, flag, EXPECTED, stand_ins=_stand_ins)
    kind, what, weights, other, saved = identify(ckpt)
    if kind is None:
        raise ArgError(f"{flag}: {path} is a checkpoint of no known kind: it holds {what}; {EXPECTED}")
    weights, merged = from_released(weights)
    target, guess = net.state_dict(), guess_architecture(weights, saved)
    if not set(weights) & set(target) and guess is None:
        shown = ", ".join(list(weights)[:3]) + (", ..." if len(weights) > 3 else "")
        raise ArgError(f"{flag}: {path} is a checkpoint of no known kind: it holds {len(weights)} tensors ({shown}), "
                       f"none named as in {_model_name(net)} nor shaped as a ViT or ResNet; {EXPECTED}")
    heads = _classifier_prefixes(net)
    new, fresh, size_mismatch = dict(target), [], None
    for key, want in target.items():
        have = weights.get(key)
        if have is not None and have.shape == want.shape:
            new[key] = have
        elif _under(key, heads):
            fresh.append(key)
        elif have is None:
            raise _arch_error(flag, path, net, f"it has no {key} {tuple(want.shape)}", guess)
        elif key == "pos_embed" and have.dim() == 3 and have.shape[2] == want.shape[2]:
            size_mismatch = size_mismatch or have.shape
        else:
            raise _arch_error(flag, path, net, f"{key} is {tuple(have.shape)} in the file, {tuple(want.shape)} "
                                               "here", guess)
    if size_mismatch is not None:
        raise _size_error(flag, path, kind, net, size_mismatch, img_size)
    net.load_state_dict(new)
    _rezero_pinned_key_bias(net)
    prefix = "encoder." if kind in ("mfm_fast_pretrain", "released_pretrain") else ""
    unused = [k for k in weights if k not in target or new[k] is not weights[k]]
    left_out = [prefix + k for k in unused] + list(other)
    loaded = sum(1 for k in target if k in weights and new[k] is weights[k])
    if merged:
        what += ", q_bias / v_bias -> qkv.bias"
    return dict(flag=flag, path=str(path), kind=kind, what=what, loaded=loaded, left_out=left_out, fresh=fresh)


def group_keys(keys) -> str:
    """"decoder.* (2), encoder.norm.* (2), pos_embed": keys grouped by their first name (after encoder.)."""
    groups: Dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        n = 2 if parts[0] == "encoder" and len(parts) > 2 else 1
        name = ".".join(parts[:n]) + (".*" if len(parts) > n else "")
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(g if not g.endswith("*") else f"{g} ({n})" for g, n in groups.items()) or "none"


def describe_init(report: dict) -> str:
    """One line: what was loaded from which kind of file, the file's tensors left out, the net's left fresh."""
    return (f"{report.get('flag', '--init')} {report['path']}: {report['what']}: loaded {report['loaded']} tensors; "
            f"left out {group_keys(report['left_out'])}; fresh {group_keys(report['fresh'])}")
