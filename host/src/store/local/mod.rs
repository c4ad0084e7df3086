//! The shared engines Lode runs on across hosts, started on this machine in a directory of
//! their own: PostgreSQL for the state and SeaweedFS for S3 blobs. The tests, `lode bench
//! cluster` and `./lode.sh cluster` use them; production points Lode at its own.

mod postgres;
mod s3;

pub use postgres::LocalPostgres;
pub use s3::LocalS3;

/// `count` distinct loopback ports nothing listens on now (each held until all are chosen,
/// so none is handed out twice).
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}
