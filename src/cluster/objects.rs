//! Typed Veil objects (CRDs) as they appear in YAML.
