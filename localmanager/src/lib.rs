//! `usm-localmanager`: one LocalManager per core scheduling uThreads.
