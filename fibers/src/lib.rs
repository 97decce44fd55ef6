//! `usm-fibers`: uThreads (workees) as corosensei coroutines on pooled, guard-paged stacks.
