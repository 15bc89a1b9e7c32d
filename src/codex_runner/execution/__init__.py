"""One job's life: its workspace (git), its processes (group, capture, kill) and its run manifest."""
