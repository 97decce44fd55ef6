//! The library constructor (`.init_array`) and the `fork` handlers.

/// Runs when the dynamic loader initialises the library (before `main`).
extern "C" fn usm_tagger_init() {
    // A panic must not cross the C boundary: the program runs unmanaged instead.
    if std::panic::catch_unwind(crate::session::start).is_err() {
        crate::state::set_mode(crate::state::Mode::Unmanaged);
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = usm_tagger_init;

/// `pthread_atfork` prepare: hold the heap lock, then the arena's, then the
/// address-space change lock, across `fork`.
pub(super) unsafe extern "C" fn atfork_prepare() {
    super::heap::fork_prepare();
    super::arena::fork_prepare();
    super::changes_fork_prepare();
}

/// `pthread_atfork` parent: release them.
pub(super) unsafe extern "C" fn atfork_parent() {
    super::changes_fork_parent();
    super::arena::fork_parent();
    super::heap::fork_parent();
}

/// `pthread_atfork` child: fresh locks, and leave the parent's session.
pub(super) unsafe extern "C" fn atfork_child() {
    super::changes_fork_child();
    super::heap::fork_child();
    super::arena::fork_child();
    crate::session::after_fork_in_child();
}
