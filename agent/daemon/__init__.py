"""The device agent daemon: `outpost agent run|status|import|enroll`.

    config      the TOML file (every key documented with its default)
    state       on-disk state, one atomic file per record
    install     verified read-only installs, anti-rollback floor, hardware pre-checks
    gate        the warm-up health gate
    updater     one bundle's update lifecycle; start-up recovery and crash-loop revert
    sync        the coordinator: long-poll, verify the assignment, dispatch
    report      the heartbeat
    gc          retention of installs and archives
    agent       everything assembled (`run_agent`)
    commands    the click group
"""
