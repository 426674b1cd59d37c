"""Facecast's media server: HTTP, WebRTC sessions, the conversation pipeline and the CLI."""
