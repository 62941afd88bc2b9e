"""Generated from proto/ by scripts/gen-clients.sh; do not edit."""
