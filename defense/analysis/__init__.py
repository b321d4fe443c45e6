"""Studies over finished runs read back from MLflow: the shared run readers and the attacks x defenses leaderboard."""
