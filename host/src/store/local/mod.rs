//! The shared engines Lode runs on across hosts, started on this machine in a directory of
//! their own: PostgreSQL for the state and SeaweedFS for S3 blobs. The tests, `lode bench
//! cluster` and `./lode.sh cluster` use them; production points Lode at its own.

mod postgres;
mod s3;

pub use postgres::LocalPostgres;
pub use s3::LocalS3;

/// A loopback port nothing listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
