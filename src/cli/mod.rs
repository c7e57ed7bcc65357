//! Commands that read the database.
