"""Process runtime shared by the agent and the fleet server (neither imports the other).

Only service-manager plumbing lives here: systemd notification and watchdog
(`runtime.sdnotify`), journal logging with secret redaction (`runtime.journal`).
"""
