//! firn-store: see ARCHITECTURE.md. Not yet implemented (issue tracker: the store issue).
