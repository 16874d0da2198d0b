"""Diagnostics behind the GPU figures in results_pipeline.md and results_train.md (one H100).

Each part prints its figures; pick parts with the first argument (default "ABC"):
  A  read+decode alone: hardware-decoder load, threads, preallocation, CPU decode, 2-3 pipelines in turn
  B  the full train pipeline (create_pipeline) with the same variants
  C  trainer.benchmark (synthetic vs pipeline batches) for several pipeline settings
  D  where the training feed loses time: fresh vs collected batches, the pipeline beside synthetic steps
  E  non-default torch stream and decoder preallocation
  F  F1: eager vs CUDA-graph steps (losses, weights, RNG state); F2: throughput with 1-2 loaders
  G  CUDA-graph training on a synthetic batch while a DALI pipeline runs beside it
  H  G and F2 with all torch work on a non-default stream
  I  G with DALI executor variants (legacy executor, queues, stream policy, concurrency)
Run it with and without CUDA_DEVICE_MAX_CONNECTIONS=32 in the environment to see the queue effect
(the trainer sets 32 itself when the variable is unset):

    source benchmarks/gpu_setup.sh PARTS...; CUDA_DEVICE_MAX_CONNECTIONS=8 python3 benchmarks/explore_gpu.py IF
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline_gpu import synth  # noqa: E402

from alexnet.pipeline import artifacts as A  # noqa: E402

B = 128
BATCHES = 150


def say(*a):
    print(*a, flush=True)


def time_pipes(pipes, batches=BATCHES, warmup=6):
    import torch

    for p in pipes:
        p.build()
    for _ in range(warmup):
        for p in pipes:
            p.run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    outs = []
    while n < batches:
        for p in pipes:
            outs = p.run()
            n += 1
    o = outs[0]
    if hasattr(o, "as_cpu"):
        o.as_cpu()
    torch.cuda.synchronize()
    return n * B / (time.perf_counter() - t0)


def main():
    parts = sys.argv[1] if len(sys.argv) > 1 else "ABC"
    from nvidia.dali import fn, pipeline_def, types

    from alexnet.pipeline.dali_pipeline import SHUFFLE_BUFFER, PipelineSpec, create_pipeline, spec_paths

    t0 = time.perf_counter()
    data = synth(Path("/tmp/alexnet_gpu_bench"), 20480)
    manifest = A.read_manifest(data)
    paths = list(spec_paths(data, manifest, "train"))
    say(f"data ready {time.perf_counter() - t0:.0f}s")
    stats, mean_image = A.read_stats(data), A.read_mean_image(data)

    def dec(threads, decoder="mixed", shard=(0, 1), **kw):
        @pipeline_def(batch_size=B, num_threads=threads, device_id=0, seed=1 + shard[0], prefetch_queue_depth=2)
        def pipe():
            jpegs, labels = fn.readers.caffe(
                path=paths,
                random_shuffle=True,
                initial_fill=SHUFFLE_BUFFER,
                pad_last_batch=True,
                shard_id=shard[0],
                num_shards=shard[1],
            )
            img = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **kw)
            return img.gpu() if decoder == "cpu" else img

        return pipe()

    def rec(name, fnc):
        try:
            r = fnc()
            say(f"  {name:<60} {r:>9,.0f} img/s")
        except Exception as e:
            say(f"  {name:<60} FAILED {type(e).__name__}: {str(e)[:300]}")

    if "A" in parts:
        say("A: read+decode only, batch 128")
        for th, hw in ((16, 0.9), (16, 1.0), (16, 0.0), (8, 1.0), (4, 1.0), (16, 0.75)):
            rec(f"mixed th={th} hw={hw}", lambda th=th, hw=hw: time_pipes([dec(th, hw_decoder_load=hw)]))
        rec(
            "mixed th=16 hw=0.9 prealloc 256",
            lambda: time_pipes([dec(16, hw_decoder_load=0.9, preallocate_width_hint=256, preallocate_height_hint=256)]),
        )
        rec("mixed th=16 hw=0.9 affine=False", lambda: time_pipes([dec(16, hw_decoder_load=0.9, affine=False)]))
        rec(
            "mixed th=16 hw=1.0 prealloc 256",
            lambda: time_pipes([dec(16, hw_decoder_load=1.0, preallocate_width_hint=256, preallocate_height_hint=256)]),
        )
        rec("cpu decode th=16 -> gpu", lambda: time_pipes([dec(16, "cpu")]))
        rec("cpu decode th=12 -> gpu", lambda: time_pipes([dec(12, "cpu")]))
        rec(
            "2 x mixed th=8 hw=0.9 (halves)",
            lambda: time_pipes([dec(8, shard=(i, 2), hw_decoder_load=0.9) for i in range(2)]),
        )
        rec(
            "2 x mixed th=8 hw=1.0 (halves)",
            lambda: time_pipes([dec(8, shard=(i, 2), hw_decoder_load=1.0) for i in range(2)]),
        )
        rec(
            "3 x mixed th=5 hw=1.0 (thirds)",
            lambda: time_pipes([dec(5, shard=(i, 3), hw_decoder_load=1.0) for i in range(3)]),
        )
        rec(
            "mixed th=4 hw=1.0 + cpu th=12 (alternate)",
            lambda: time_pipes([dec(4, shard=(0, 2), hw_decoder_load=1.0), dec(12, "cpu", shard=(1, 2))]),
        )

    spec0 = PipelineSpec(shard_paths=tuple(paths), is_training=True, batch_size=B, num_threads=16, device_id=0)

    def full(specs):
        return time_pipes([create_pipeline(s, mean_image, stats) for s in specs])

    if "B" in parts:
        say("B: full train pipeline")
        for th, hw in ((16, 0.9), (16, 1.0), (8, 1.0)):
            rec(
                f"full th={th} hw={hw}", lambda th=th, hw=hw: full([replace(spec0, num_threads=th, hw_decoder_load=hw)])
            )
        rec("full decoder=cpu th=16", lambda: full([replace(spec0, decoder="cpu")]))
        rec("full decoder=cpu th=14", lambda: full([replace(spec0, decoder="cpu", num_threads=14)]))
        for k, th, hw in ((2, 8, 0.9), (2, 8, 1.0), (3, 5, 1.0)):
            rec(
                f"full {k} x th={th} hw={hw}",
                lambda k=k, th=th, hw=hw: full(
                    [replace(spec0, num_threads=th, hw_decoder_load=hw, shard_id=i, num_shards=k) for i in range(k)]
                ),
            )
        rec(
            "full 2 x roi th=8 hw=1.0",
            lambda: full(
                [
                    replace(spec0, num_threads=8, hw_decoder_load=1.0, roi_decode=True, shard_id=i, num_shards=2)
                    for i in range(2)
                ]
            ),
        )

    if "C" in parts:
        from alexnet.trainer.bench import benchmark
        from alexnet.trainer.config import TrainConfig

        say("C: training bf16 channels_last batch 128, synthetic vs pipeline")
        variants = [
            dict(num_threads=16, hw_decoder_load=0.9),
            dict(num_threads=8, hw_decoder_load=1.0),
            dict(num_threads=4, hw_decoder_load=1.0),
            dict(num_threads=8, hw_decoder_load=0.9),
            dict(num_threads=12, decoder="cpu"),
            dict(num_threads=14, decoder="cpu"),
        ]
        for v in variants:
            try:
                cfg = TrainConfig.create(
                    data_dir=str(data),
                    gpus="0",
                    batch_size=B,
                    bf16=True,
                    channels_last=True,
                    prefetch=3,
                    progress=False,
                    **v,
                )
                r = benchmark(cfg, warmup=10, steps=100)
                say(
                    f"  {str(v):<60} synth {r['synthetic_images_per_s']:8,.0f}  pipe {r['pipeline_images_per_s']:8,.0f}"
                    f"  ratio {r['ratio']:.3f}"
                )
            except Exception:
                traceback.print_exc()
    if "D" in parts:
        part_d(data)
    if "E" in parts:
        part_e(data)
    if "F" in parts:
        part_f(data)
    if "G" in parts:
        part_g(data, paths)
    if "I" in parts:
        part_i(data, paths)
    if "H" in parts:
        import torch

        with torch.cuda.stream(torch.cuda.Stream()):
            say("H: everything on a non-default torch stream")
            part_g(data, paths, short=True)
            part_f(data, f2_only=True)
    say(f"done {time.perf_counter() - t0:.0f}s")


def part_d(data):
    import collections
    import itertools

    import torch

    from alexnet.pipeline.loader import LoaderConfig, create_loader
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.step import train_step

    say("D: where the training feed loses time (bf16, channels_last, batch 128, th 8, hw 0.9)")
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    model = AlexNet(num_classes=1000, devices=[dev]).to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    model.train()
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    kw = {"bf16": True, "channels_last": True, "output_device": model.output_device}
    x0 = torch.randn(B, 3, 224, 224, device=dev) * 50
    y0 = torch.randint(0, 1000, (B,), device=dev)

    def endless(loader):
        while True:
            yield from loader

    def run(name, it, steps=100, warm=10, side=None):
        for _ in range(warm):
            x, y = next(it)
            train_step(model, opt, x, y, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host = 0.0
        for _ in range(steps):
            h = time.perf_counter()
            x, y = next(it)
            host += time.perf_counter() - h
            if side is not None:
                side()
            last = train_step(model, opt, x, y, **kw)
        float(last)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        say(f"  {name:<58} {steps * B / dt:8,.0f} img/s  host in next() {1e3 * host / steps:.2f} ms/step")

    def synthetic():
        while True:
            yield x0, y0

    def cfg(**k):
        return LoaderConfig(batch_size=B, num_threads=8, device="cuda:0", prefetch=3, hw_decoder_load=0.9, **k)

    run("synthetic", synthetic())
    ld = create_loader(data, "train", cfg())
    run("loader", endless(ld))
    run("synthetic again", synthetic())

    def kept(it, n=6):
        keep = collections.deque(maxlen=n)
        for b in it:
            keep.append(b)
            yield b

    run("loader, last 6 batches kept alive", kept(endless(ld)))

    def cloned(it):
        for x, y in it:
            yield x.clone(), y.clone()

    run("loader, clone on torch's stream", cloned(endless(ld)))
    pre = [next(endless(ld)) for _ in range(40)]
    run("40 pipeline batches collected first, cycled", itertools.cycle(pre))
    del pre
    it = endless(ld)
    run("synthetic while the loader runs (batches dropped)", synthetic(), side=lambda: next(it))
    la = create_loader(data, "train", replace(cfg(), shard_id=0, num_shards=2))
    lb = create_loader(data, "train", replace(cfg(), shard_id=1, num_shards=2))

    def alternate():
        ia, ib = endless(la), endless(lb)
        while True:
            yield next(ia)
            yield next(ib)

    run("2 loaders (halves) alternated, 8 threads each", alternate())
    run("synthetic at the end", synthetic())


def part_e(data):
    import contextlib

    import torch
    from nvidia.dali import fn

    from alexnet.pipeline.loader import LoaderConfig, create_loader
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.step import train_step

    say("E: default-stream syncs? side stream, decoder preallocation (bf16, channels_last, batch 128)")
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    model = AlexNet(num_classes=1000, devices=[dev]).to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    model.train()
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    kw = {"bf16": True, "channels_last": True, "output_device": model.output_device}
    x0 = torch.randn(B, 3, 224, 224, device=dev) * 50
    y0 = torch.randint(0, 1000, (B,), device=dev)
    orig_image = fn.decoders.image
    extra = {}

    def patched(*a, **k):
        if k.get("device") == "mixed":
            k.update(extra)
        return orig_image(*a, **k)

    fn.decoders.image = patched

    def endless(loader):
        while True:
            yield from loader

    def run(name, it, steps=100, warm=10, stream=None):
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for _ in range(warm):
                x, y = next(it)
                train_step(model, opt, x, y, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            host = 0.0
            for _ in range(steps):
                h = time.perf_counter()
                x, y = next(it)
                host += time.perf_counter() - h
                last = train_step(model, opt, x, y, **kw)
            t_host = time.perf_counter() - t0
            float(last)
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        say(
            f"  {name:<58} {steps * B / dt:8,.0f} img/s  next() {1e3 * host / steps:.2f} ms, host loop "
            f"{1e3 * t_host / steps:.2f} ms/step, total {1e3 * dt / steps:.2f} ms/step"
        )

    def synthetic():
        while True:
            yield x0, y0

    def cfg(**k):
        base = dict(batch_size=B, num_threads=8, device="cuda:0", prefetch=3, hw_decoder_load=0.9)
        base.update(k)
        return LoaderConfig(**base)

    side = torch.cuda.Stream()
    run("synthetic", synthetic())
    run("synthetic, side stream", synthetic(), stream=side)
    run("loader", endless(create_loader(data, "train", cfg())))
    run("loader, side stream", endless(create_loader(data, "train", cfg())), stream=side)
    extra.update(preallocate_width_hint=256, preallocate_height_hint=256)
    run("loader, prealloc 256", endless(create_loader(data, "train", cfg())))
    run("loader, prealloc 256, side stream", endless(create_loader(data, "train", cfg())), stream=side)
    run(
        "loader hw 1.0, prealloc 256, side stream",
        endless(create_loader(data, "train", cfg(hw_decoder_load=1.0))),
        stream=side,
    )
    extra.clear()
    run(
        "loader decoder=cpu th 12, side stream",
        endless(create_loader(data, "train", cfg(decoder="cpu", num_threads=12))),
        stream=side,
    )
    run("loader decoder=cpu th 12", endless(create_loader(data, "train", cfg(decoder="cpu", num_threads=12))))
    run("synthetic at the end", synthetic())


def part_f(data, f2_only=False):
    import torch

    from alexnet.pipeline.loader import LoaderConfig, create_loader
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer, set_lr
    from alexnet.trainer.step import GraphedStep, train_step

    dev = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    kw = {"bf16": True, "channels_last": True, "output_device": dev}

    def fresh():
        torch.manual_seed(0)
        m = AlexNet(num_classes=1000, devices=[dev]).to(memory_format=torch.channels_last)
        m.train()
        return m, create_optimizer(m, 0.01, 0.9, 5e-4)

    g = torch.Generator(device=dev).manual_seed(5)
    batches = [
        (
            torch.randn(B, 3, 224, 224, device=dev, generator=g) * 50,
            torch.randint(0, 1000, (B,), device=dev, generator=g),
        )
        for _ in range(12)
    ]
    say("F1: eager vs graphed step, same start, 12 steps (lr /10 after step 8)")
    res = []
    for graphed in () if f2_only else (False, True):
        m, o = fresh()
        torch.cuda.manual_seed(123)
        step = GraphedStep(m, o, **kw) if graphed else (lambda x, y, m=m, o=o: train_step(m, o, x, y, **kw))
        losses = []
        for i, (x, y) in enumerate(batches):
            if i == 8:
                set_lr(o, 0.001)
            losses.append(float(step(x, y)))
        w = torch.cat([p.detach().float().reshape(-1) for p in m.parameters()])
        res.append((losses, w, torch.cuda.get_rng_state()))
        if graphed:
            say(f"  captures {step.captures}")
    if res:
        (l0, w0, r0), (l1, w1, r1) = res
        say(f"  losses eager  {[round(v, 4) for v in l0]}")
        say(f"  losses graph  {[round(v, 4) for v in l1]}")
        say(
            f"  max |w_eager - w_graph| {float((w0 - w1).abs().max()):.3g}; rng state equal {bool(torch.equal(r0, r1))}"
        )

    say("F2: throughput, bf16 channels_last batch 128")

    def endless(loader):
        while True:
            yield from loader

    def synthetic():
        x0, y0 = batches[0]
        while True:
            yield x0, y0

    def cfg(**k):
        base = dict(batch_size=B, num_threads=8, device="cuda:0", prefetch=3, hw_decoder_load=0.9)
        base.update(k)
        return LoaderConfig(**base)

    def alternate(k, th, hw=0.9):
        its = [
            endless(create_loader(data, "train", cfg(shard_id=i, num_shards=k, num_threads=th, hw_decoder_load=hw)))
            for i in range(k)
        ]
        while True:
            for it in its:
                yield next(it)

    for graphed in (False, True):
        m, o = fresh()
        step = GraphedStep(m, o, **kw) if graphed else (lambda x, y, m=m, o=o: train_step(m, o, x, y, **kw))  # noqa: B023

        def run(name, it, steps=150, warm=10, step=step, graphed=graphed):
            for _ in range(warm):
                step(*next(it))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                last = step(*next(it))
            th = time.perf_counter() - t0
            float(last)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            say(
                f"  graph={graphed!s:<5} {name:<44} {steps * B / dt:8,.0f} img/s  host {1e3 * th / steps:.2f} / total {1e3 * dt / steps:.2f} ms/step"
            )

        run("synthetic", synthetic())
        run("loader th 8 hw 0.9", endless(create_loader(data, "train", cfg())))
        run("2 loaders th 6 hw 0.9 alternated", alternate(2, 6))
        run("2 loaders th 4 hw 1.0 alternated", alternate(2, 4, 1.0))
        run("synthetic again", synthetic())


def part_g(data, paths, short=False):
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from alexnet.pipeline.dali_pipeline import SHUFFLE_BUFFER, PipelineSpec, create_pipeline
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.step import GraphedStep

    dev = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    kw = {"bf16": True, "channels_last": True, "output_device": dev}
    torch.manual_seed(0)
    m = AlexNet(num_classes=1000, devices=[dev]).to(memory_format=torch.channels_last)
    m.train()
    o = create_optimizer(m, 0.01, 0.9, 5e-4)
    step = GraphedStep(m, o, **kw)
    x0 = torch.randn(B, 3, 224, 224, device=dev) * 50
    y0 = torch.randint(0, 1000, (B,), device=dev)
    stats, mean_image = A.read_stats(data), A.read_mean_image(data)

    def dec(th, kind, **kw2):
        @pipeline_def(batch_size=B, num_threads=th, device_id=0, seed=1, prefetch_queue_depth=3)
        def pipe():
            jpegs, labels = fn.readers.caffe(path=paths, random_shuffle=True, initial_fill=SHUFFLE_BUFFER)
            if kind == "read":
                return labels.gpu()
            if kind == "cpu":
                return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB).gpu()
            return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, **kw2)

        return pipe()

    spec0 = PipelineSpec(
        shard_paths=tuple(paths), is_training=True, batch_size=B, num_threads=8, device_id=0, prefetch=3
    )

    def run(name, pipe=None, steps=120):
        if pipe is not None:
            pipe.build()
            for _ in range(4):
                pipe.run()
        for _ in range(12):
            step(x0, y0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        side = 0.0
        for _ in range(steps):
            if pipe is not None:
                h = time.perf_counter()
                pipe.run()
                side += time.perf_counter() - h
            last = step(x0, y0)
        float(last)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        say(
            f"  {name:<52} train {steps * B / dt:8,.0f} img/s  ({1e3 * dt / steps:.2f} ms/step, pipe.run {1e3 * side / steps:.2f} ms)"
        )

    say("G: graphed training on one synthetic batch while a DALI pipeline runs beside it (one batch per step)")
    run("nothing beside")
    variants = (
        ("reader only", lambda: dec(4, "read")),
        ("decode mixed hw 1.0 th 4", lambda: dec(4, "mixed", hw_decoder_load=1.0)),
        ("decode mixed hw 0.9 th 8", lambda: dec(8, "mixed", hw_decoder_load=0.9)),
        ("decode mixed hw 0.0 th 8", lambda: dec(8, "mixed", hw_decoder_load=0.0)),
        (
            "decode mixed hw 1.0 th 4 prealloc",
            lambda: dec(4, "mixed", hw_decoder_load=1.0, preallocate_width_hint=256, preallocate_height_hint=256),
        ),
        ("decode cpu th 12 -> gpu", lambda: dec(12, "cpu")),
        (
            "full pipeline mixed hw 1.0 th 4",
            lambda: create_pipeline(replace(spec0, num_threads=4, hw_decoder_load=1.0), mean_image, stats),
        ),
        ("full pipeline mixed hw 0.9 th 8", lambda: create_pipeline(spec0, mean_image, stats)),
        (
            "full pipeline decoder=cpu th 12",
            lambda: create_pipeline(replace(spec0, num_threads=12, decoder="cpu"), mean_image, stats),
        ),
        (
            "full pipeline mean=channel mixed hw 1.0 th 4",
            lambda: create_pipeline(
                replace(spec0, num_threads=4, hw_decoder_load=1.0, mean="channel"), mean_image, stats
            ),
        ),
    )
    if short:
        variants = [variants[i] for i in (0, 2, 5, 7, 8)]
    for name, mk in variants:
        try:
            run(name, mk())
        except Exception as e:
            say(f"  {name} FAILED {e!r}"[:300])
    run("nothing beside (again)")


def part_i(data, paths):
    import nvidia.dali as nd
    import torch
    from nvidia.dali import types

    from alexnet.pipeline.dali_pipeline import PipelineSpec, create_pipeline
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.step import GraphedStep

    dev = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    kw = {"bf16": True, "channels_last": True, "output_device": dev}
    torch.manual_seed(0)
    m = AlexNet(num_classes=1000, devices=[dev]).to(memory_format=torch.channels_last)
    m.train()
    o = create_optimizer(m, 0.01, 0.9, 5e-4)
    step = GraphedStep(m, o, **kw)
    x0 = torch.randn(B, 3, 224, 224, device=dev) * 50
    y0 = torch.randint(0, 1000, (B,), device=dev)
    stats, mean_image = A.read_stats(data), A.read_mean_image(data)
    orig = nd.pipeline_def
    extra = {}

    def patched(fn_=None, **k):
        k.update(extra)
        return orig(fn_, **k)

    nd.pipeline_def = patched
    spec0 = PipelineSpec(
        shard_paths=tuple(paths),
        is_training=True,
        batch_size=B,
        num_threads=8,
        device_id=0,
        prefetch=3,
        enable_checkpointing=False,
    )

    def run(name, pipe=None, steps=100):
        if pipe is not None:
            pipe.build()
            for _ in range(4):
                pipe.run()
        for _ in range(12):
            step(x0, y0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        side = 0.0
        for _ in range(steps):
            if pipe is not None:
                h = time.perf_counter()
                pipe.run()
                side += time.perf_counter() - h
            last = step(x0, y0)
        float(last)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        say(
            f"  {name:<60} train {steps * B / dt:8,.0f} img/s  ({1e3 * dt / steps:.2f} ms/step, pipe.run {1e3 * side / steps:.2f} ms)"
        )

    say("I: graphed training + full pipeline beside it, executor variants")
    run("nothing beside")
    SP = getattr(types, "StreamPolicy", None) or getattr(nd.pipeline, "StreamPolicy", None)
    OC = getattr(types, "OperatorConcurrency", None) or getattr(nd.pipeline, "OperatorConcurrency", None)
    say(f"  StreamPolicy {SP}, OperatorConcurrency {OC}")
    variants = [
        ("dynamic (default)", {}, {}),
        ("legacy executor (exec_dynamic=False)", {"exec_dynamic": False}, {}),
        (
            "legacy, separated queues cpu 4 gpu 3",
            {"exec_dynamic": False, "prefetch_queue_depth": {"cpu_size": 4, "gpu_size": 3}},
            {},
        ),
        ("legacy hw 1.0 th 4", {"exec_dynamic": False}, {"hw_decoder_load": 1.0, "num_threads": 4}),
        ("legacy decoder=cpu th 12", {"exec_dynamic": False}, {"decoder": "cpu", "num_threads": 12}),
    ]
    if SP is not None:
        for name in ("SINGLE", "PER_OPERATOR"):
            if hasattr(SP, name):
                variants.append((f"dynamic stream_policy={name}", {"stream_policy": getattr(SP, name)}, {}))
    if OC is not None and hasattr(OC, "FULL"):
        variants.append(("dynamic concurrency=FULL", {"concurrency": OC.FULL}, {}))
    for name, pk, sk in variants:
        extra.clear()
        extra.update(pk)
        try:
            p = create_pipeline(replace(spec0, **sk), mean_image, stats)
            run(name, p)
            del p
        except Exception as e:
            say(f"  {name} FAILED {e!r}"[:300])
    extra.clear()
    run("nothing beside (again)")


if __name__ == "__main__":
    main()
