"""An independent restatement of the official Energy Matching network and sampler, for parity tests.

Written from the official description (``EBViTModelWrapper`` over torchcfm's ``UNetModelWrapper``,
``sample_cifar_heun_1gpu.py`` through torchsde's Heun) in plain functional torch: it builds its own
random official-format state dict (key names and shapes from its own reading of the layout) and
evaluates ``V`` from that dict alone, so it shares no code with ``models/``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OFFICIAL_FLAGS = dict(num_channels=128, num_res_blocks=2, channel_mult=(1, 2, 2, 2), attention_resolutions="16",
                      num_heads=4, num_head_channels=64, embed_dim=384, transformer_nheads=4, transformer_nlayers=8,
                      output_scale=1000.0, patch_size=4, image_size=32, in_channels=3)


def _layout(f: dict):
    """[(prefix, kind, channels_in, channels_out)] of the UNet's modules, in official key order."""
    mc, size = f["num_channels"], f["image_size"]
    attn_ds = {size // int(r) for r in f["attention_resolutions"].split(",")}
    blocks, ch, ds, chans = [("input_blocks.0.0", "conv", f["in_channels"], mc * f["channel_mult"][0])], mc * f["channel_mult"][0], 1, []
    chans.append(ch)
    idx = 1
    for level, mult in enumerate(f["channel_mult"]):
        for _ in range(f["num_res_blocks"]):
            blocks.append((f"input_blocks.{idx}.0", "res", ch, mult * mc))
            ch = mult * mc
            if ds in attn_ds:
                blocks.append((f"input_blocks.{idx}.1", "attn", ch, ch))
            chans.append(ch)
            idx += 1
        if level != len(f["channel_mult"]) - 1:
            blocks.append((f"input_blocks.{idx}.0", "down", ch, ch))
            chans.append(ch)
            idx += 1
            ds *= 2
    blocks += [("middle_block.0", "res", ch, ch), ("middle_block.1", "attn", ch, ch), ("middle_block.2", "res", ch, ch)]
    idx = 0
    for level, mult in list(enumerate(f["channel_mult"]))[::-1]:
        for i in range(f["num_res_blocks"] + 1):
            blocks.append((f"output_blocks.{idx}.0", "res", ch + chans.pop(), mult * mc))
            ch = mult * mc
            j = 1
            if ds in attn_ds:
                blocks.append((f"output_blocks.{idx}.{j}", "attn", ch, ch))
                j += 1
            if level and i == f["num_res_blocks"]:
                blocks.append((f"output_blocks.{idx}.{j}", "up", ch, ch))
                ds //= 2
            idx += 1
    return blocks


def random_official_state(f: dict = OFFICIAL_FLAGS, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A random state dict with the official key names and shapes (nothing zero, so every path counts)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name, *shape, norm=False):
        if norm and name.endswith("weight"):
            sd[name] = 1.0 + scale * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            sd[name] = torch.randn(shape, generator=g) * (scale if len(shape) == 1 else 1.0 / math.sqrt(fan_in))

    mc, emb = f["num_channels"], 4 * f["num_channels"]
    put("time_embed.0.weight", emb, mc), put("time_embed.0.bias", emb)
    put("time_embed.2.weight", emb, emb), put("time_embed.2.bias", emb)
    for prefix, kind, cin, cout in _layout(f):
        if kind == "conv":
            put(f"{prefix}.weight", cout, cin, 3, 3), put(f"{prefix}.bias", cout)
        elif kind == "res":
            put(f"{prefix}.in_layers.0.weight", cin, norm=True), put(f"{prefix}.in_layers.0.bias", cin)
            put(f"{prefix}.in_layers.2.weight", cout, cin, 3, 3), put(f"{prefix}.in_layers.2.bias", cout)
            put(f"{prefix}.emb_layers.1.weight", cout, emb), put(f"{prefix}.emb_layers.1.bias", cout)
            put(f"{prefix}.out_layers.0.weight", cout, norm=True), put(f"{prefix}.out_layers.0.bias", cout)
            put(f"{prefix}.out_layers.3.weight", cout, cout, 3, 3), put(f"{prefix}.out_layers.3.bias", cout)
            if cin != cout:
                put(f"{prefix}.skip_connection.weight", cout, cin, 1, 1), put(f"{prefix}.skip_connection.bias", cout)
        elif kind == "attn":
            put(f"{prefix}.norm.weight", cin, norm=True), put(f"{prefix}.norm.bias", cin)
            put(f"{prefix}.qkv.weight", 3 * cin, cin, 1), put(f"{prefix}.qkv.bias", 3 * cin)
            put(f"{prefix}.proj_out.weight", cin, cin, 1), put(f"{prefix}.proj_out.bias", cin)
        elif kind == "down":
            put(f"{prefix}.op.weight", cout, cin, 3, 3), put(f"{prefix}.op.bias", cout)
        else:
            put(f"{prefix}.conv.weight", cout, cin, 3, 3), put(f"{prefix}.conv.bias", cout)
    first = mc * f["channel_mult"][0]
    put("out.0.weight", first, norm=True), put("out.0.bias", first)
    put("out.2.weight", f["in_channels"], first, 3, 3), put("out.2.bias", f["in_channels"])
    d, p = f["embed_dim"], f["patch_size"]
    put("patch_embed.pos_embed", 1, (f["image_size"] // p) ** 2, d)
    put("patch_embed.patch_embed.weight", d, f["in_channels"], p, p), put("patch_embed.patch_embed.bias", d)
    for i in range(f["transformer_nlayers"]):
        q = f"transformer_encoder.layers.{i}"
        put(f"{q}.self_attn.in_proj_weight", 3 * d, d), put(f"{q}.self_attn.in_proj_bias", 3 * d)
        put(f"{q}.self_attn.out_proj.weight", d, d), put(f"{q}.self_attn.out_proj.bias", d)
        put(f"{q}.linear1.weight", 4 * d, d), put(f"{q}.linear1.bias", 4 * d)
        put(f"{q}.linear2.weight", d, 4 * d), put(f"{q}.linear2.bias", d)
        put(f"{q}.norm1.weight", d, norm=True), put(f"{q}.norm1.bias", d)
        put(f"{q}.norm2.weight", d, norm=True), put(f"{q}.norm2.bias", d)
    put("final_linear.weight", 1, d), put("final_linear.bias", 1)
    return sd


def _gn(sd, name, h):
    return F.group_norm(h.float(), 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _res(sd, p, h, emb):
    a = F.conv2d(F.silu(_gn(sd, f"{p}.in_layers.0", h)), sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    a = a + F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    a = F.conv2d(F.silu(_gn(sd, f"{p}.out_layers.0", a)), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    skip = h if f"{p}.skip_connection.weight" not in sd else F.conv2d(h, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return skip + a


def _attn(sd, p, h, head_channels):
    b, c, hh, ww = h.shape
    x = h.reshape(b, c, -1)
    qkv = F.conv1d(_gn(sd, f"{p}.norm", x), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    heads = c // head_channels
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, -1).split(head_channels, dim=1)
    s = head_channels ** -0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (x + F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])).reshape(b, c, hh, ww)


def _encoder_layer(sd, q, x, nheads):
    b, t, d = x.shape
    qkv = F.linear(x, sd[f"{q}.self_attn.in_proj_weight"], sd[f"{q}.self_attn.in_proj_bias"])
    qq, kk, vv = (z.reshape(b, t, nheads, d // nheads).transpose(1, 2) for z in qkv.split(d, dim=-1))
    w = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(d // nheads), dim=-1)
    a = (w @ vv).transpose(1, 2).reshape(b, t, d)
    x = F.layer_norm(x + F.linear(a, sd[f"{q}.self_attn.out_proj.weight"], sd[f"{q}.self_attn.out_proj.bias"]),
                     (d,), sd[f"{q}.norm1.weight"], sd[f"{q}.norm1.bias"])
    ff = F.linear(F.gelu(F.linear(x, sd[f"{q}.linear1.weight"], sd[f"{q}.linear1.bias"])),
                  sd[f"{q}.linear2.weight"], sd[f"{q}.linear2.bias"])
    return F.layer_norm(x + ff, (d,), sd[f"{q}.norm2.weight"], sd[f"{q}.norm2.bias"])


def potential(sd: dict, x: torch.Tensor, f: dict = OFFICIAL_FLAGS) -> torch.Tensor:
    """V(x) (B,) of the official network with weights ``sd``."""
    mc = f["num_channels"]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    t = torch.full((x.shape[0],), 0.5)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    emb = F.linear(F.silu(F.linear(temb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    stages: dict[str, list] = {}
    for prefix, kind, _, _ in _layout(f):
        stage = prefix.rsplit(".", 1)[0]
        stages.setdefault(stage, []).append((prefix, kind))

    def run(stage, h):
        for prefix, kind in stages[stage]:
            if kind == "conv":
                h = F.conv2d(h, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], padding=1)
            elif kind == "res":
                h = _res(sd, prefix, h, emb)
            elif kind == "attn":
                h = _attn(sd, prefix, h, f["num_head_channels"])
            elif kind == "down":
                h = F.conv2d(h, sd[f"{prefix}.op.weight"], sd[f"{prefix}.op.bias"], stride=2, padding=1)
            else:
                h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), sd[f"{prefix}.conv.weight"],
                             sd[f"{prefix}.conv.bias"], padding=1)
        return h

    h, skips = x, []
    for stage in [s for s in stages if s.startswith("input_blocks")]:
        h = run(stage, h)
        skips.append(h)
    h = run("middle_block", h)
    for stage in [s for s in stages if s.startswith("output_blocks")]:
        h = run(stage, torch.cat([h, skips.pop()], dim=1))
    h = F.conv2d(F.silu(_gn(sd, "out.0", h)), sd["out.2.weight"], sd["out.2.bias"], padding=1)
    tok = F.conv2d(h, sd["patch_embed.patch_embed.weight"], sd["patch_embed.patch_embed.bias"], stride=f["patch_size"])
    tok = tok.flatten(2).transpose(1, 2) + sd["patch_embed.pos_embed"]
    for i in range(f["transformer_nlayers"]):
        tok = _encoder_layer(sd, f"transformer_encoder.layers.{i}", tok, f["transformer_nheads"])
    return F.linear(tok.mean(dim=1), sd["final_linear.weight"], sd["final_linear.bias"]).view(-1) * f["output_scale"]


def velocity(sd: dict, x: torch.Tensor, f: dict = OFFICIAL_FLAGS) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(potential(sd, x, f).sum(), x)
    return -g


def official_heun(drift, x: torch.Tensor, t_end: float, dt: float, eps_of_t, brownian) -> torch.Tensor:
    """The official ``solve_sde_heun`` through torchsde's fixed-step Heun loop, restated: output times
    ``arange(0, t_end + 1e-9, dt)`` in float32, steps ``min(t + dt, ts[-1])`` with float32 time
    accumulation, ``g = sqrt(2 eps(t))`` at both ends, ``brownian(t0, t1)`` the increment; clamp at the end."""
    ts = torch.arange(0.0, t_end + 1e-9, dt)
    y, cur = x.clone(), ts[0]
    for out_t in ts[1:]:
        while cur < out_t:
            nxt = torch.minimum(cur + dt, ts[-1])
            h = nxt - cur
            g0, g1 = math.sqrt(2 * eps_of_t(float(cur))), math.sqrt(2 * eps_of_t(float(nxt)))
            dw = brownian(float(cur), float(nxt), y.shape) if g0 or g1 else torch.zeros_like(y)
            f0 = drift(y)
            yp = y + h * f0 + g0 * dw
            y = y + (h * (f0 + drift(yp)) + g0 * dw + g1 * dw) * 0.5
            cur = nxt
    return y.clamp(-1, 1)
