"""Drives a running sd-worker with the official A1111 client, `webuiapi` (PyPI), as a user's script would.

Every call goes through webuiapi's own request building and response parsing; a step that raises, or
answers something a webuiapi user could not use, fails the run (exit status 1). Meant for a worker started
on the tiny fixtures (tools/webuiapi_check.sh does that), so the names below are the fixtures':
the `sd15` model, the `sd15_kohya` LoRA, the `mystyle`/`badhand` embeddings and the `sd15` ControlNet.

    python tools/webuiapi_check.py --port 7871
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import webuiapi
from PIL import Image


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        check.failed += 1


check.failed = 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7871)
    args = ap.parse_args()
    api = webuiapi.WebUIApi(host=args.host, port=args.port, sampler="Euler a", steps=2)
    api.util_wait_for_ready(check_interval=0.5)

    models = api.get_sd_models()
    check("sd-models lists the loaded model", any(m["model_name"] == "sd15" for m in models), str(models))
    check("samplers include Euler a", "Euler a" in api.util_get_sampler_names())
    check("schedulers are listed", len(api.util_get_scheduler_names()) > 0)
    check("loras list the LoRA folder", any(l["name"] == "sd15_kohya" for l in api.get_loras()))
    emb = api.get_embeddings()
    check("embeddings are loaded", "mystyle" in emb["loaded"] and "xlstyle" in emb["skipped"], str(emb))
    ups = [u["name"] for u in api.get_upscalers()]
    check("upscalers list the upscaler folder", "realesrgan_x4_params_ema" in ups, str(ups))
    check("options answer", "sd_model_checkpoint" in api.get_options())
    api.util_set_model("sd15")
    check("util_set_model to the loaded model", api.util_get_current_model().startswith("sd15"), api.util_get_current_model())
    api.refresh_checkpoints()
    check("sd-models lists the models folder", any(m["model_name"] == "sd2" for m in api.get_sd_models()), str(api.get_sd_models()))
    api.util_set_model("sd2")
    check("util_set_model switches checkpoints", api.util_get_current_model().startswith("sd2"), api.util_get_current_model())
    r = api.txt2img(prompt="a cat", width=32, height=32, steps=2, seed=5)
    check("txt2img runs on the chosen checkpoint", r.info["sd_model_name"] == "sd2", str(r.info.get("sd_model_name")))
    r = api.txt2img(prompt="a cat", width=32, height=32, steps=2, seed=5, override_settings={"sd_model_checkpoint": "sd15"})
    check("override_settings runs one request on another checkpoint", r.info["sd_model_name"] == "sd15" and api.util_get_current_model().startswith("sd2"))
    api.util_set_model("sd15")
    check("util_set_model switches back", api.util_get_current_model().startswith("sd15"), api.util_get_current_model())
    check("sd-vae lists the VAE folder", any(v["model_name"] == "xl-vae" for v in api.get_sd_vae()), str(api.get_sd_vae()))
    api.set_options({"sd_vae": "xl-vae"})
    r = api.txt2img(prompt="a cat", width=32, height=32, steps=2, seed=5)
    check("sd_vae switches the VAE", "VAE: xl-vae" in r.info["infotexts"][0] and api.get_options()["sd_vae"] == "xl-vae", r.info["infotexts"][0])
    api.set_options({"sd_vae": "Automatic"})

    r = api.txt2img(prompt="a mystyle cat <lora:sd15_kohya:0.8>", negative_prompt="badhand", width=32, height=32, steps=2, seed=5, cfg_scale=7)
    check("txt2img returns an image", isinstance(r.image, Image.Image) and r.image.size == (32, 32))
    infotext = r.info["infotexts"][0]
    check("infotext names LoRA and embeddings", "Lora hashes" in infotext and "TI hashes" in infotext, infotext)
    again = api.txt2img(prompt="a mystyle cat <lora:sd15_kohya:0.8>", negative_prompt="badhand", width=32, height=32, steps=2, seed=5, cfg_scale=7)
    check("a seed reproduces its image", again.image.tobytes() == r.image.tobytes())
    info = api.png_info(r.image)
    check("png-info reads the parameters back", info.info == infotext, f"{info.info!r} vs {infotext!r}")

    i2i = api.img2img(images=[r.image], prompt="a dog", denoising_strength=0.5, width=32, height=32, steps=2, seed=1)
    check("img2img returns an image", i2i.image.size == (32, 32))
    mask = Image.new("RGB", (32, 32), "black")
    mask.paste((255, 255, 255), (16, 0, 32, 32))
    inp = api.img2img(images=[r.image], mask_image=mask, prompt="a hat", denoising_strength=1.0, width=32, height=32, steps=2, seed=1)
    check("inpainting returns an image", inp.image.size == (32, 32))

    hr = api.txt2img(prompt="a house", width=32, height=32, steps=2, seed=3, enable_hr=True, hr_scale=1.5, denoising_strength=0.6)
    check("hires fix renders at the scaled size", hr.image.size == (48, 48), str(hr.image.size))
    hr = api.txt2img(prompt="a cat", width=32, height=32, steps=2, seed=5, enable_hr=True, hr_scale=2,
                     hr_upscaler="realesrgan_x4_params_ema", denoising_strength=0.5)
    check("hires fix through an ESRGAN model", hr.image.size == (64, 64) and "Hires upscaler: realesrgan_x4_params_ema" in hr.info["infotexts"][0], str(hr.info["infotexts"][0]))
    up = api.extra_single_image(image=hr.image, upscaler_1="realesrgan_x4_params_ema", upscaling_resize=2)
    check("extra-single-image upscales with an ESRGAN model", up.image.size == (128, 128), str(up.image.size))
    up = api.extra_batch_images(images=[hr.image, hr.image], upscaler_1="Lanczos", upscaling_resize=1.5)
    check("extra-batch-images upscales each picture", [i.size for i in up.images] == [(96, 96), (96, 96)], str([i.size for i in up.images]))
    var = api.txt2img(prompt="a house", width=32, height=32, steps=2, seed=3, subseed=9, subseed_strength=0.4)
    check("variation seeds answer", "Variation seed: 9" in var.info["infotexts"][0], var.info["infotexts"][0])
    editing = api.txt2img(prompt="a [red:blue:1] [house|tree]", width=32, height=32, steps=3, seed=3)
    check("prompt editing and alternation run", editing.image.size == (32, 32))

    check("controlnet model list", "sd15" in " ".join(api.controlnet_model_list()), str(api.controlnet_model_list()))
    check("controlnet module list", "canny" in api.controlnet_module_list())
    control = Image.new("RGB", (32, 32), "black")
    control.paste((255, 255, 255), (8, 8, 24, 24))
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model="sd15", threshold_a=50, threshold_b=120)
    cn = api.txt2img(prompt="a tree", width=32, height=32, steps=2, seed=7, controlnet_units=[unit])
    check("txt2img with a ControlNet unit", cn.image.size == (32, 32) and "ControlNet 0" in cn.info["infotexts"][0])

    # Interrupt: the long call still returns images (A1111 answers 200 with what it has).
    out = {}

    def long_job():
        try:
            out["r"] = api.txt2img(prompt="a long one", width=32, height=32, steps=1000, seed=2)
        except Exception as e:  # noqa: BLE001 - the check below reports it
            out["e"] = e

    t = threading.Thread(target=long_job)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and api.get_progress()["state"].get("sampling_step", 0) < 2:
        time.sleep(0.05)
    api.interrupt()
    t.join(120)
    check("an interrupted txt2img returns its images", "r" in out and out["r"].image.size == (32, 32), repr(out.get("e")))

    print(f"{check.failed} failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
