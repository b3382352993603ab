"""Code shared by the three services: settings, the S3 store, keys, events, gRPC plumbing.

It may import grpc, redis, rq and minio; the core package ``slmcl`` never imports it.
"""
