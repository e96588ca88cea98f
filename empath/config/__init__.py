"""empath.config"""
