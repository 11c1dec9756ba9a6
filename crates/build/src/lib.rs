//! firn-build: see ARCHITECTURE.md. Not yet implemented (issue tracker: the build issue).
