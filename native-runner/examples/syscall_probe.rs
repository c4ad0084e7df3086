//! A test helper run inside containers: calls each syscall number given on the command line
//! with all-zero arguments and prints `number errno` (0 when the call succeeded). Tests pass
//! only numbers the seccomp profile refuses, so none of them runs.

fn main() {
    for arg in std::env::args().skip(1) {
        let Ok(number) = arg.parse::<libc::c_long>() else {
            println!("{arg} not-a-number");
            continue;
        };
        // SAFETY: a raw syscall with all-zero arguments; the kernel checks every pointer.
        let result = unsafe { libc::syscall(number, 0, 0, 0, 0, 0, 0) };
        let errno = if result == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        println!("{number} {errno}");
    }
}
