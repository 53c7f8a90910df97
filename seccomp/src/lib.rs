//! Seccomp filters per process and thread role, and Landlock helpers.
