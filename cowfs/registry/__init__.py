"""Registries: pull images into the store and push them out, over the OCI distribution API v2.

One module per concept:

* reference: `[registry/]repository[:tag][@digest]` with Docker's defaults (docker.io, library/,
  latest);
* auth: credentials (docker config.json, credential helpers, skopeo's auth.json) and the
  Basic/Bearer challenge dance;
* transport: per-thread HTTP(S) connections, TLS, proxies;
* client: the v2 endpoints, authentication, retries, blob verification while streaming;
* manifest: manifests, image indexes and descriptors (Docker schema 2 and OCI), platforms;
* cache: what blobs registries hold and what they are (skips exports, enables mounts);
* pull: registry -> store (pull, ensure_image); push: store -> registry (push).

Importing this package imports nothing else: the CLI loads the parts it needs.
"""
