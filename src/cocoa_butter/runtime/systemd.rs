//! systemd's side of the runtime (`Type=notify`): READY once every room
//! runs as desired, STATUS naming the paused or waiting rooms, the watchdog.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cocoa_butter::status::RoomState;

/// Tells systemd (`Type=notify`) READY=1 once every enabled room runs as
/// its operator wants it (ready, or paused on purpose), keeps STATUS saying
/// which rooms are ready, paused or waiting, and pings its watchdog while
/// the runtime is alive. Without `NOTIFY_SOCKET` the notifications are
/// no-ops.
pub(super) async fn notify_systemd(
    states: Vec<(String, Arc<RoomState>)>,
    shutdown: CancellationToken,
) {
    use sd_notify::NotifyState;
    let mut announced = false;
    let mut last_status = String::new();
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(Duration::from_millis(100), |w| {
        (w / 2).min(Duration::from_millis(100))
    });
    let mut last_ping = std::time::Instant::now();
    loop {
        let status = systemd_status(&states);
        let started = states.iter().all(|(_, state)| state.as_desired());
        if (started && !announced) || (announced && status != last_status) {
            let mut notes = vec![NotifyState::Status(&status)];
            if !announced {
                notes.insert(0, NotifyState::Ready);
            }
            if let Err(err) = sd_notify::notify(&notes) {
                tracing::warn!(error = %err, "cannot notify systemd");
            }
            announced = true;
            last_status.clone_from(&status);
        }
        if let Some(interval) = watchdog
            && last_ping.elapsed() >= interval / 2
        {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            last_ping = std::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// The unit's one-line STATUS: `4 room(s): 3 ready, paused: conch`, with a
/// `waiting: <room>` part for rooms that are neither.
pub(super) fn systemd_status(states: &[(String, Arc<RoomState>)]) -> String {
    let mut ready = 0;
    let mut paused = Vec::new();
    let mut waiting = Vec::new();
    for (name, state) in states {
        if state.ready() {
            ready += 1;
        } else if state.as_desired() {
            paused.push(name.as_str());
        } else {
            waiting.push(name.as_str());
        }
    }
    let mut status = format!("{} room(s): {ready} ready", states.len());
    if !paused.is_empty() {
        status.push_str(&format!(", paused: {}", paused.join(" ")));
    }
    if !waiting.is_empty() {
        status.push_str(&format!(", waiting: {}", waiting.join(" ")));
    }
    status
}
