"""Registry tests: names, versions, manifests, the store and the home, file and S3 remotes, trust, bundles,
hostile registries, faults, crashes and concurrency."""
