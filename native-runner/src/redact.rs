//! Secret values kept out of what code prints: function logs and build steps' output.

/// `line` with every secret value replaced by `***`, so a print cannot leak one into logs.
/// Values under 4 bytes are left alone: they would mask ordinary text.
pub fn mask(line: &str, secrets: &[String]) -> String {
    let mut line = line.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        if line.contains(secret.as_str()) {
            line = line.replace(secret.as_str(), "***");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_in_log_lines() {
        let secrets = vec!["hunter22".to_string(), "ab".to_string()];
        assert_eq!(mask("token=hunter22 ok", &secrets), "token=*** ok");
        // Values too short to be secrets would mask ordinary text; they are left.
        assert_eq!(mask("ab cd", &secrets), "ab cd");
    }
}
