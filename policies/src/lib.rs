//! `usm-policies`: the policy API, the registry and the built-in policies.
#![forbid(unsafe_code)]
