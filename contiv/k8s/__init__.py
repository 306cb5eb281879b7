"""Where netmaster learns the cluster: the API server's list+watch, or a manifests directory."""
