//! The file source: a directory of Kubernetes objects as YAML.
