"""Where the pipeline's files live, relative to the project root, declared once.

The stages import these names, and ``dvc.yaml`` reads this file as its variables (``vars:
[imtok/layout.py]``, then ``${SHARDS}/train``), so moving an output is one edit here. DVC reads only
the top-level string assignments of this file (without importing it): keep them plain literals.
"""

SHARDS = "data/shards"  # prepare: WebDataset image shards, train/ and val/
RAW = "data/raw"  # prepare: downloaded source files, where a source downloads
TOKENS = "data/tokens"  # extract_tokens: token shards, train/ and val/
SAMPLES = "data/samples"  # sample: generated images
TOKENIZER = "models/tokenizer"  # train_tokenizer: tokenizer.pt and its summary
PRIOR = "models/prior"  # train_prior: prior.pt and its summary
CLASSIFIER = "models/classifier"  # train_classifier: classifier.pt, the domain feature network
CHECKPOINTS = "checkpoints"  # training checkpoints, <stage>/<run fingerprint>/
REPORTS = "reports"  # run facts of every stage (<stage>.json), the sample grid, the validated params
METRICS = "metrics"  # evaluate_tokenizer, evaluate: the metrics DVC compares
PLOTS = "plots"  # evaluate_tokenizer, evaluate: curves and histograms DVC plots
