"""Metrics: reconstruction (PSNR, SSIM), codebook (usage, perplexity), samples (FID, precision/recall)."""

from imtok.metrics.codebook import CodeCounter, code_perplexity, codebook_usage
from imtok.metrics.features import (
    AvailableExtractors,
    ClassifierFeatures,
    ExtractedFeatures,
    FeatureExtractor,
    extract_features,
    feature_extractors,
    metric_name,
)
from imtok.metrics.fid import (
    PrecisionRecall,
    check_comparable,
    class_accuracy,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    precision_recall,
    sample_metrics,
)
from imtok.metrics.inception import (
    WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionFeatures,
    InceptionWeights,
    load_inception_weights,
    read_inception_weights,
)
from imtok.metrics.recon import psnr, reconstruction_metrics, ssim

__all__ = [
    "WEIGHTS_ENV",
    "AvailableExtractors",
    "ClassifierFeatures",
    "CodeCounter",
    "ExtractedFeatures",
    "FIDInceptionV3",
    "FeatureExtractor",
    "InceptionFeatures",
    "InceptionWeights",
    "PrecisionRecall",
    "check_comparable",
    "class_accuracy",
    "code_perplexity",
    "codebook_usage",
    "extract_features",
    "feature_extractors",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "load_inception_weights",
    "metric_name",
    "precision_recall",
    "psnr",
    "read_inception_weights",
    "reconstruction_metrics",
    "sample_metrics",
    "ssim",
]
