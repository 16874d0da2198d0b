"""``alexnet-prep``: offline data preparation (thin click commands; the work lives in modules)."""

from __future__ import annotations

import click

from alexnet.pipeline.cli_common import LazyGroup, version_option

COMMANDS = {
    "make-sample": "alexnet.tools.sample:make_sample_command",
    "build-lmdb": "alexnet.tools.build_lmdb:build_lmdb_command",
    "verify": "alexnet.tools.verify:verify_command",
    "pca-stats": "alexnet.tools.pca_stats:pca_stats_command",
    "preview": "alexnet.tools.preview:preview_command",
    "bench-pipeline": "alexnet.tools.bench_pipeline:bench_pipeline_command",
    "order": "alexnet.tools.order:order_command",
}

EPILOG = """\b
Examples:
  alexnet-prep make-sample sample/               # the built-in sample dataset
  alexnet-prep build-lmdb /imagenet              # ImageNet tree -> ./data LMDB shards
  alexnet-prep build-lmdb /downloads             # ImageNet's archives (tars + devkit, or Kaggle's zip), in place
  alexnet-prep pca-stats                         # mean image + RGB PCA -> ./data
  alexnet-prep verify --sample 1000              # check records against the manifest
  alexnet-prep preview --split train --n 16 --out preview.npz
  alexnet-prep order --split train --epoch 2     # record positions replica 0 reads in epoch 2
  ALEXNET_DATA_DIR=/fast/imagenet-lmdb alexnet-prep pca-stats
"""


@click.group(
    cls=LazyGroup, lazy_commands=COMMANDS, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@version_option("alexnet-prep")
def main() -> None:
    """Prepare ImageNet for AlexNet: LMDB shards of shorter-side-256 centre crops, the mean image and RGB PCA."""
    from alexnet.pipeline.images import pil_info

    info = pil_info()
    if not info["simd"]:  # decoding and resizing run on PIL: say so before a long job starts
        click.echo(
            f"warning: plain Pillow {info['version']} has shadowed pillow-simd; image work will be slower "
            "(repair: pip install --force-reinstall --no-binary pillow-simd pillow-simd)",
            err=True,
        )


if __name__ == "__main__":
    main()
