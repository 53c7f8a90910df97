//! What every Cloister vhost-user backend daemon shares.
