"""diffusers side of tools/bench_txt2img.sh: one txt2img run of a diffusers SD 1.5 folder on the CPU
in F32 (Euler, CFG 7.5, 512², seed 1, torch on 2 threads), timed from import to image.

    python tools/bench_txt2img.py DIR STEPS OUT.png
"""

import sys
import time

start = time.perf_counter()

import torch  # noqa: E402  (imports are part of what a user waits for)
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402


def main():
    folder, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(2)
    with torch.inference_mode():
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, variant="fp16", torch_dtype=torch.float32, safety_checker=None, feature_extractor=None)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        loaded = time.perf_counter()
        image = pipe("a cat", num_inference_steps=steps, guidance_scale=7.5, height=512, width=512,
                     generator=torch.Generator().manual_seed(1)).images[0]
    image.save(out)
    done = time.perf_counter()
    print(f"diffusers: start to loaded {loaded - start:.1f} s, generate {done - loaded:.1f} s")


if __name__ == "__main__":
    main()
