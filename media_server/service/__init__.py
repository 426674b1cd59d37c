"""The model APIs' work, between the HTTP handlers and the engines: decoding any audio, the checks every
request needs, a persona's reply to chat messages, speech as WAV or PCM, and MP4s of the avatar speaking,
rendered through the same lip-sync engine as live sessions, in a bounded queue, without blocking the
event loop. Nothing here knows HTTP: failures are ``ServiceError``s, which the HTTP layer turns into statuses.
"""
