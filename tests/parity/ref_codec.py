"""Reference codec oracle: runs fish-speech 0.1.0's DAC in the isolated .refenv.

Run only as a subprocess with the reference interpreter:

    .refenv/bin/python tests/parity/ref_codec.py CONFIG.json CODEC.pth IN.npz OUT.npz

CONFIG.json uses the fields of ``modded_dac_vq.yaml`` (s1_mini's ``codec_config.json``
format). The model is built without Hydra from the reference constructors (spec §11.1)
and loaded as the reference loader does (spec §1.1: ``weights_only``, ``state_dict``
unwrapping, ``generator.`` rewrite, ``strict=False``, ``assign=True``, ``eval``).

IN.npz: every array named ``audio*`` ([B, L] float32) is encoded, every array named
``codes*`` ([B, N, T] int) is decoded. OUT.npz gets, per input name ``k``:
``k.codes``, ``k.encoder``, ``k.pre_module`` (encode) or ``k.audio``, ``k.post_module``,
``k.upsample`` (decode), captured with forward hooks; plus ``missing_keys`` and
``unexpected_keys`` of the load.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import torch
from fish_speech.models.dac.modded_dac import DAC, ModelArgs, WindowLimitedTransformer
from fish_speech.models.dac.rvq import DownsampleResidualVectorQuantize


def build(config: dict) -> DAC:
    config = dict(config)
    quantizer = dict(config.pop("quantizer"))
    modules = {}
    for name in ("pre_module", "post_module"):
        spec = dict(quantizer.pop(name))
        args = ModelArgs(**spec.pop("config"))
        modules[name] = WindowLimitedTransformer(config=args, **spec)
    general = config.pop("transformer_general_config", None)
    if general is not None:
        general = functools.partial(ModelArgs, **general)
    return DAC(
        **config,
        quantizer=DownsampleResidualVectorQuantize(**quantizer, **modules),
        transformer_general_config=general,
    )


def load(model: DAC, path: str):
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    if any("generator" in k for k in state):
        state = {k.replace("generator.", ""): v for k, v in state.items() if "generator." in k}
    result = model.load_state_dict(state, strict=False, assign=True)
    model.eval()
    return result


def capture(modules: dict[str, torch.nn.Module], out: dict, prefix: str):
    def hook(name):
        def save(module, args, output):
            out[f"{prefix}.{name}"] = output.detach().float().numpy()

        return save

    return [m.register_forward_hook(hook(n)) for n, m in modules.items()]


def main(config_path: str, checkpoint: str, inputs: str, outputs: str) -> None:
    torch.manual_seed(0)
    # One thread: with two, the reference's encoder output was seen to change from run to
    # run (by ~1e-2 on the full-size checkpoint, flipping a near-tie code) whenever the
    # parent test process had used its own OpenMP threads just before; with one it never did.
    torch.set_num_threads(1)
    with open(config_path) as f:
        model = build(json.load(f))
    result = load(model, checkpoint)
    out = {
        "missing_keys": np.array(result.missing_keys, dtype=str),
        "unexpected_keys": np.array(result.unexpected_keys, dtype=str),
    }
    q = model.quantizer
    with torch.inference_mode(), np.load(inputs) as data:
        for name in data.files:
            array = torch.from_numpy(data[name])
            if name.startswith("audio"):
                # Hooks only on the stages whose output the encode keeps (it also runs
                # post_module and upsample and discards them, spec §6.5).
                hooks = capture({"encoder": model.encoder, "pre_module": q.pre_module}, out, name)
                codes, _ = model.encode(array.float())
                out[f"{name}.codes"] = codes.numpy()
            elif name.startswith("codes"):
                hooks = capture({"post_module": q.post_module, "upsample": q.upsample}, out, name)
                lengths = torch.full((array.shape[0],), array.shape[-1])
                audio, _ = model.decode(array.long(), lengths)
                out[f"{name}.audio"] = audio[:, 0].numpy()
            else:
                raise SystemExit(f"unknown input {name!r}: names start with 'audio' or 'codes'")
            for h in hooks:
                h.remove()
    np.savez(outputs, **out)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
