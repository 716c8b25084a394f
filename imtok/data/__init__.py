"""Image data: sources (Fashion-MNIST, image folders, synthetic) and WebDataset shards (local or S3).

Importing this package registers an ``s3://`` scheme in webdataset's ``gopen`` (boto3 underneath).
"""

from imtok.data.encoding import SkippedImage, encode_png
from imtok.data.s3 import register_s3_scheme, upload_split
from imtok.data.shards import (
    Batch,
    ShardError,
    ShardLoader,
    SplitReport,
    batch_pipeline,
    collate_images,
    decode_png,
    decode_png_uint8,
    iter_samples,
    read_meta,
    shard_urls,
    to_float,
    to_uint8,
    write_split,
)
from imtok.data.sources import (
    SPLITS,
    FashionMNIST,
    ImageFolder,
    Source,
    SourceItem,
    SyntheticShapes,
    UnreadableImage,
    fit_image,
    locate_fashion_mnist,
    source_from_params,
)

__all__ = [
    "SPLITS",
    "Batch",
    "FashionMNIST",
    "ImageFolder",
    "ShardError",
    "ShardLoader",
    "SkippedImage",
    "Source",
    "SourceItem",
    "SplitReport",
    "SyntheticShapes",
    "UnreadableImage",
    "batch_pipeline",
    "collate_images",
    "decode_png",
    "decode_png_uint8",
    "encode_png",
    "fit_image",
    "iter_samples",
    "locate_fashion_mnist",
    "read_meta",
    "register_s3_scheme",
    "shard_urls",
    "source_from_params",
    "to_float",
    "to_uint8",
    "upload_split",
    "write_split",
]
