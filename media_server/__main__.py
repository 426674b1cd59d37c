from media_server.cli import main

main()
