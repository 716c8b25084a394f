"""Image data: sources (Fashion-MNIST, image folders, synthetic) and WebDataset shards (local or S3).

Importing ``imtok.data.shards`` registers an ``s3://`` scheme in webdataset's ``gopen`` (boto3
underneath). Import what you need from the modules: ``sources``, ``encoding``, ``shards``,
``tokens``, ``s3``.
"""
