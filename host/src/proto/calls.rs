//! Calls as the API answers them and the CLI reads them: a spawned call's record
//! (`GET /v1/calls/{id}`) and the history of finished calls (`lode calls APP`).

use std::time::Duration;

use lode_native_runner::agent::ErrorInfo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest `GET /v1/calls/{id}?wait=` may hold a request.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Where a spawned call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// Queued or running.
    Running,
    /// Returned a value.
    Succeeded,
    /// Raised, or could not run.
    Failed,
    /// Cancelled before it finished (`FunctionCall.cancel()`).
    Cancelled,
}

/// A spawned call as `GET /v1/calls/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallRecord {
    /// The call's id.
    pub call_id: String,
    /// The app.
    pub app: String,
    /// The function.
    pub function: String,
    /// `wasm` or `python`.
    #[serde(default)]
    pub engine: String,
    /// Where it is.
    pub status: CallStatus,
    /// The result, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The pickled result, for pickle functions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_pickled: Option<String>,
    /// The error, once it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// How long it ran, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The host that runs it, where hosts share the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Error messages are cut to this many bytes in the record.
pub const MAX_MESSAGE: usize = 1024;

/// One finished call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Milliseconds since the Unix epoch, when the call arrived.
    pub created_ms: u64,
    /// The app.
    pub app: String,
    /// The function.
    pub function: String,
    /// `wasm` or `python`.
    pub engine: String,
    /// `succeeded` or `failed`.
    pub status: CallStatus,
    /// How long the call took, queueing included, in milliseconds.
    pub duration_ms: f64,
    /// 0 for a call from outside; more for a call a function made.
    pub depth: u32,
    /// Why it failed: the error's kind and the start of its message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

impl HistoryRecord {
    /// The error as recorded: kind and message, the message cut short, no traceback.
    pub fn summarize(error: &ErrorInfo) -> ErrorInfo {
        let mut message = error.message.clone();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        ErrorInfo {
            kind: error.kind.clone(),
            module: error.module.clone(),
            message,
            traceback: None,
        }
    }
}

/// `GET /v1/apps/{app}/calls`: recent calls, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The records.
    pub calls: Vec<HistoryRecord>,
}

/// How `POST .../call` answers: the result, the pickled result, or the error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CallAnswer {
    /// The function returned a JSON value.
    Value {
        /// What it returned.
        result: Value,
    },
    /// A pickle function returned a Python object.
    Pickled {
        /// Its pickle, base64.
        result_pickled: String,
    },
    /// It raised, or could not run.
    Failed {
        /// What went wrong.
        error: ErrorInfo,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let error = ErrorInfo::lode("trap", "é".repeat(MAX_MESSAGE));
        let summary = HistoryRecord::summarize(&error);
        assert!(summary.message.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert!(summary.message.ends_with('…'));
        assert_eq!(summary.kind, "trap");
    }
}
